"""Metrics of the stages: durations, outcomes, and what a publish made, under ``tf_export.<model>.``.

Plain StatsD has no tags, so the model is part of every name::

    tf_export.<model>.<stage>.duration        timer (ms): discover, export, validate, publish
    tf_export.<model>.<stage>.<outcome>       counter: published, skipped, gated, no_new_checkpoint, failed
    tf_export.<model>.version                 gauge: the version a publish made
    tf_export.<model>.bytes                   gauge: that version's bytes
    tf_export.<model>.latency_ratio           gauge: against the reference version, when the gate measured it

Where they go: inside an Airflow task, Airflow's own stats (the hook binds
that sink, so ``[metrics] statsd_on``/``otel_on`` decide); from the command
line, StatsD over UDP at ``TF_EXPORT_STATSD=host:port`` or the config's
``metrics.statsd``; else nowhere. Sending never fails nor holds up a stage:
UDP is fire-and-forget, and any error is dropped.

Example::

    from tf_export_pipeline.metrics import StatsdSink
    sink = StatsdSink("127.0.0.1", 8125)
    sink.timing("tf_export.demo.export.duration", 1234.5)
    sink.incr("tf_export.demo.publish.published")
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import socket
from collections.abc import Iterator
from typing import Any, Protocol

from tf_export_pipeline.records import Status

PREFIX = "tf_export"
STATSD_ENV = "TF_EXPORT_STATSD"
STAGES = ("discover", "export", "validate", "publish")
FAILED = Status.FAILED.value
# The outcomes counted: a stage's verdict on its checkpoint, not the hand-offs between stages.
COUNTED = frozenset(s.value for s in (Status.PUBLISHED, Status.SKIPPED, Status.GATED, Status.NO_NEW_CHECKPOINT,
                                      Status.FAILED))
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")  # '.' too: it would split the model into two levels of the name

log = logging.getLogger(__name__)


class Sink(Protocol):
    """Where metrics go: StatsD's three kinds."""

    def incr(self, name: str, count: int = 1) -> None: ...

    def timing(self, name: str, millis: float) -> None: ...

    def gauge(self, name: str, value: float) -> None: ...


class NullSink:
    def incr(self, name: str, count: int = 1) -> None:
        pass

    def timing(self, name: str, millis: float) -> None:
        pass

    def gauge(self, name: str, value: float) -> None:
        pass


class StatsdSink:
    """StatsD's line protocol over UDP, one packet per metric."""

    def __init__(self, host: str, port: int):
        self.address: tuple[Any, ...] = (host, port)  # a socket address, as getaddrinfo gives it
        self._sock: socket.socket | None = None
        try:
            info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
            self._sock = socket.socket(info[0], socket.SOCK_DGRAM)
            self._sock.setblocking(False)
            self.address = info[4][:2]
        except OSError as err:
            log.warning("metrics: StatsD address %s:%s unusable (%s); no metrics are sent", host, port, err)

    def _send(self, line: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto(line.encode("ascii", "replace"), self.address)
        except OSError:
            pass  # a StatsD server that is down refuses on loopback; nothing to wait for

    def incr(self, name: str, count: int = 1) -> None:
        self._send(f"{name}:{count}|c")

    def timing(self, name: str, millis: float) -> None:
        self._send(f"{name}:{millis:.3f}|ms")

    def gauge(self, name: str, value: float) -> None:
        text = str(int(value)) if float(value).is_integer() else repr(float(value))  # a version keeps every digit
        # StatsD reads a leading sign as a change of the gauge, not its value.
        self._send(f"{name}:0|g\n{name}:{text}|g" if value < 0 else f"{name}:{text}|g")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()


def parse_address(value: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for an IPv6 address) as a pair; ValueError when it is not one."""
    host, sep, port = value.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not host:port: {value!r}")
    return host, int(port)


def model_name(cfg) -> str:
    """The model in metric names: the config file's name without .yaml, as in the DAG ids (the export
    base's folder name for a config made in code)."""
    source = getattr(cfg, "source", None)
    stem = os.path.splitext(os.path.basename(source))[0] if source else \
        os.path.basename(str(cfg.export_base).rstrip("/")) or "model"
    return _UNSAFE.sub("_", stem).strip("_") or "model"


def metric(cfg, *parts: str) -> str:
    return ".".join((PREFIX, model_name(cfg), *parts))


_BOUND: contextvars.ContextVar[Sink | None] = contextvars.ContextVar("tf_export_metrics", default=None)
_STATSD: dict[tuple[str, int], StatsdSink] = {}


@contextlib.contextmanager
def bound(sink: Sink) -> Iterator[Sink]:
    """Send the metrics of the stages called inside to ``sink`` (Airflow's stats in a task)."""
    token = _BOUND.set(sink)
    try:
        yield sink
    finally:
        _BOUND.reset(token)


def sink_for(cfg) -> Sink:
    """The sink in force: the bound one, else StatsD at $TF_EXPORT_STATSD or ``metrics.statsd``, else none."""
    bound_sink = _BOUND.get()
    if bound_sink is not None:
        return bound_sink
    address = os.environ.get(STATSD_ENV) or getattr(getattr(cfg, "metrics", None), "statsd", None)
    if not address:
        return NullSink()
    try:
        host, port = parse_address(address)
    except ValueError:
        log.warning("metrics: %s is not host:port (%r); no metrics are sent", STATSD_ENV, address)
        return NullSink()
    if (host, port) not in _STATSD:
        _STATSD[(host, port)] = StatsdSink(host, port)
    return _STATSD[(host, port)]


def _number(value: Any) -> float | int | None:
    # An int stays one: a StatsD client may print 1796227807.0 for a version otherwise.
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def performance_of(record: dict | None) -> dict:
    """The performance section of a validated record's report (empty when there is none)."""
    validation = (record or {}).get("validation") if isinstance(record, dict) else None
    return ((validation or {}).get("performance") or {}) if isinstance(validation, dict) else {}


def record_stage(cfg, stage: str, seconds: float, result: Any = None, failed: bool = False,
                 given: Any = None) -> None:
    """Send one stage's metrics: its duration, its outcome, and for a publish what it made. ``given`` is
    the record the stage was handed (a publish's validated record carries the validation report)."""
    try:
        sink = sink_for(cfg)
        if isinstance(sink, NullSink):
            return
        sink.timing(metric(cfg, stage, "duration"), seconds * 1000.0)
        status = FAILED if failed else (result.get("status") if isinstance(result, dict) else None)
        if status is not None and status in COUNTED:
            sink.incr(metric(cfg, stage, status))
        if stage == "publish" and status == Status.PUBLISHED.value:
            made = {"version": _number(result.get("version")),
                    "bytes": _number((result.get("model_size") or {}).get("bytes")),
                    "latency_ratio": _number(performance_of(given).get("latency_ratio"))}
            for name, value in made.items():
                if value is not None:
                    sink.gauge(metric(cfg, name), value)
    except Exception as err:  # noqa: BLE001 - metrics never fail an export
        log.warning("metrics: not sent (%s)", err)
