"""What the command-line servers print: one wording for the single-process and the cluster server.

The token never appears in it: terminals, CI logs and process supervisors keep stdout, and whoever reads them
should not be able to join every stream. The line says where the token goes instead."""

from __future__ import annotations

PROG = "run_server.py"


def listen_error(host: str, port: int, exc: OSError) -> str:
    """The one line for an address that cannot be bound (in use, no permission, no such interface)."""
    return f"{PROG}: error: cannot listen on {host}:{port}: {exc.strerror or exc}"


def ready_line(url: str, token_required: bool, detail: str = "") -> str:
    """'ready: open <url> ...' (tests and scripts parse the URL after 'open '); with a token, a placeholder."""
    shown = url + ("?token=<token>" if token_required else "")
    where = "  (the token is the one set with --token, --token-file or $PACKFORCING_TOKEN)" if token_required else ""
    inside = f"{detail}; Ctrl+C stops" if detail else "Ctrl+C stops"
    return f"ready: open {shown} in a browser  ({inside}){where}"
