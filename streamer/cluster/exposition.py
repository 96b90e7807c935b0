"""Merge several servers' Prometheus text into one, each sample labelled by the server it came from.

The front door's /metrics is every worker's /metrics with a `worker="<name>"` label added to every sample, each
metric family's HELP/TYPE written once (the exposition format wants a family's samples together).
"""

from __future__ import annotations


def add_label(sample: str, name: str, value: str) -> str:
    """`metric{a="b"} 1` -> `metric{<name>="<value>",a="b"} 1`; `metric 1` -> `metric{<name>="<value>"} 1`."""
    value = value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    cut = min((i for i in (sample.find("{"), sample.find(" ")) if i >= 0), default=len(sample))
    label = f'{name}="{value}"'
    if cut < len(sample) and sample[cut] == "{":
        rest = sample[cut + 1:]
        return f"{sample[:cut]}{{{label}{'' if rest.startswith('}') else ','}{rest}"
    return f"{sample[:cut]}{{{label}}}{sample[cut:]}"


def merge(texts: dict[str, str], label: str = "worker") -> str:
    """One exposition from {server name: its exposition text}; families keep their first-seen order."""
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for server, text in texts.items():
        family = None
        for line in text.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                family = line.split()[2]
                head = headers.setdefault(family, [])
                samples.setdefault(family, [])
                if not any(h.split()[1] == line.split()[1] for h in head):
                    head.append(line)
            elif line and not line.startswith("#"):
                name = line.split("{", 1)[0].split(" ", 1)[0]
                if family is None or not name.startswith(family):
                    family = name                        # a sample with no header: its own family
                    headers.setdefault(family, [])
                    samples.setdefault(family, [])
                samples[family].append(add_label(line, label, server))
    out = [line for family in headers for line in headers[family] + samples[family]]
    return "\n".join(out) + "\n" if out else ""
