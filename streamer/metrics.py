"""Prometheus metrics in the text exposition format (version 0.0.4), by hand: counters, gauges, histograms.

One `Registry` per server (no module-level state). Everything is updated from the event loop thread.
"""

from __future__ import annotations

import bisect
import math
from typing import Callable, Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _fmt(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()):
        self.name, self.help, self.labelnames = name, help, tuple(labelnames)

    def _key(self, labels: dict) -> tuple[str, ...]:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._values: dict[tuple, float] = {} if self.labelnames else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels) -> None:
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels) -> float:
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        return self.header() + [f"{self.name}{_labels(self.labelnames, k)} {_fmt(v)}"
                                for k, v in sorted(self._values.items())]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, *a, fn: Callable[[], float] | None = None, **kw):
        super().__init__(*a, **kw)
        self._fn = fn
        self._value = 0.0

    def set(self, value: float) -> None:
        self._value = float(value)

    def value(self) -> float:
        return float(self._fn()) if self._fn is not None else self._value

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_fmt(self.value())}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Iterable[float]):
        super().__init__(name, help)
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * (len(self.buckets) + 1)  # last one is +Inf
        self._sum = 0.0
        self._n = 0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self.buckets, value)] += 1
        self._sum += value
        self._n += 1

    @property
    def count(self) -> int:
        return self._n

    def render(self) -> list[str]:
        lines, cum = self.header(), 0
        for bound, c in zip(self.buckets + (math.inf,), self._counts):
            cum += c
            lines.append(f'{self.name}_bucket{{le="{_fmt(bound)}"}} {cum}')
        lines += [f"{self.name}_sum {_fmt(self._sum)}", f"{self.name}_count {self._n}"]
        return lines


class Registry:
    def __init__(self):
        self._metrics: dict[str, _Metric] = {}

    def _add(self, metric: _Metric):
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} registered twice")
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name, help, labelnames=()) -> Counter:
        return self._add(Counter(name, help, labelnames))

    def gauge(self, name, help, fn=None) -> Gauge:
        return self._add(Gauge(name, help, fn=fn))

    def histogram(self, name, help, buckets) -> Histogram:
        return self._add(Histogram(name, help, buckets))

    def render(self) -> str:
        return "\n".join(line for m in self._metrics.values() for line in m.render()) + "\n"


class ServerMetrics:
    """The server's metrics, by name. `sessions`, `ready` etc. are gauges read from the server when scraped."""

    CHUNK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)

    BATCH_BUCKETS = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0)

    def __init__(self, sessions: Callable[[], float], ready: Callable[[], float], rtf: Callable[[], float],
                 loop_lag: Callable[[], float], batch_size: Callable[[], float] = lambda: 0.0,
                 max_sessions: Callable[[], float] = lambda: 0.0, pipeline: Callable[[], float] = lambda: 0.0):
        r = self.registry = Registry()
        r.gauge("streamer_ready", "1 once the model is loaded and warmed up", fn=ready)
        r.gauge("streamer_sessions", "live generation sessions", fn=sessions)
        self.sessions_total = r.counter("streamer_sessions_total", "sessions opened since start")
        self.rejected = r.counter("streamer_rejected_total", "connections refused, by reason", ("reason",))
        self.errors = r.counter("streamer_errors_total", "error messages sent to clients, by code", ("code",))
        self.chunks = r.counter("streamer_chunks_total", "chunks generated")
        self.frames_generated = r.counter("streamer_frames_generated_total", "frames generated")
        self.frames_sent = r.counter("streamer_frames_sent_total", "video frames sent to peers")
        self.frames_repeated = r.counter(
            "streamer_frames_repeated_total", "frames sent again because generation was behind (underrun)")
        self.chunk_seconds = r.histogram(
            "streamer_chunk_latency_seconds", "chunk latency: queued on the device worker + generation",
            self.CHUNK_BUCKETS)
        r.gauge("streamer_realtime_factor",
                "video seconds generated per second of device time, over recent chunks of all sessions", fn=rtf)
        r.gauge("streamer_event_loop_lag_seconds", "worst event loop lateness over the last 10 s", fn=loop_lag)
        r.gauge("streamer_max_sessions", "admission limit (with --max-sessions auto: sized from device memory)",
                fn=max_sessions)
        r.gauge("streamer_batch_size", "sessions advanced by the latest batched device step", fn=batch_size)
        r.gauge("streamer_pipeline", "1 when chunks decode on a side worker while the next batch denoises "
                "(--pipeline)", fn=pipeline)
        self.batch_sessions = r.histogram(
            "streamer_batch_sessions", "sessions per batched device step (one model call per denoising step for all)",
            self.BATCH_BUCKETS)
        self.batch_seconds = r.histogram(
            "streamer_batch_seconds", "device time of one batched step (all its sessions' chunks)", self.CHUNK_BUCKETS)
        self.finish_seconds = r.histogram(
            "streamer_finish_seconds", "time of one chunk's finish (decode, compressed backup) on the side worker, "
            "with the pipeline on (not in streamer_batch_seconds)", self.CHUNK_BUCKETS)

    def render(self) -> str:
        return self.registry.render()
