"""Prometheus metrics of the syncs of one model directory.

:class:`SyncMetrics` counts what :class:`~apollo_sync.sync.SyncResult` s say and
is a ``prometheus_client`` collector: ``apollo-sync watch --metrics-port`` serves
it over HTTP; ``--metrics-textfile`` writes it for node_exporter's textfile
collector (one-shot syncs from cron or a timer: each run reads the counters the
file holds, adds its sync and writes the file again, under a lock of its own, so
the counters keep counting from run to run).

Every series carries the ``model_dir`` label, so one node_exporter can collect
the files of several directories (one file per directory: a file's counters
are those of the directory it names). Families (counters end in ``_total``)::

    apollo_sync_syncs_total{outcome}          changed | unchanged | torn | failed
    apollo_sync_sync_seconds                  histogram of SyncResult.seconds
    apollo_sync_bytes_compared_total          SyncResult.total_compared
    apollo_sync_bytes_changed_total           SyncResult.total_changed
    apollo_sync_bytes_logged_total            SyncResult.log_bytes
    apollo_sync_bytes_written_total           SyncResult.bytes_written
    apollo_sync_elements_changed_total        SyncResult.elements_changed
    apollo_sync_recoveries_total              syncs that first recovered an interrupted one
    apollo_sync_generation                    the committed generation (read at collection)
    apollo_sync_checkpoint                    the generation durable on disk
    apollo_sync_rollback_points               generations a rollback can restore
    apollo_sync_log_bytes                     bytes of the logs kept
    apollo_sync_producer_alive                1 / 0 (absent where unknown)
    apollo_sync_last_sync_timestamp_seconds   end of the last sync, any outcome
    apollo_sync_last_success_timestamp_seconds
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server, write_to_textfile
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families

from apollo_sync import journal as gens
from apollo_sync.errors import ApolloSyncError
from apollo_sync.sync import SyncResult

OUTCOMES = ("changed", "unchanged", "torn", "failed")
#: Upper bounds of the sync-seconds histogram: a sync of a small model on a CPU
#: takes tens of milliseconds, one of a 54 GB model minutes.
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, math.inf)
#: Counter name (without ``_total``) -> the SyncResult field it adds up.
BYTE_COUNTERS = {
    "bytes_compared": ("total_compared", "bytes the syncs compared"),
    "bytes_changed": ("total_changed", "bytes of the blocks the syncs changed"),
    "bytes_logged": ("log_bytes", "bytes the syncs appended to the XOR-delta log"),
    "bytes_written": ("bytes_written", "bytes the syncs wrote into the shards"),
    "elements_changed": ("elements_changed", "elements the syncs changed"),
}


@dataclass
class _Counts:
    syncs: dict[str, float] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0.0))
    #: Observations per bucket (not cumulative), in BUCKETS order.
    buckets: list[float] = field(default_factory=lambda: [0.0] * len(BUCKETS))
    seconds_sum: float = 0.0
    totals: dict[str, float] = field(default_factory=lambda: dict.fromkeys(BYTE_COUNTERS, 0.0))
    recoveries: float = 0.0
    producer_alive: bool | None = None
    last_sync: float | None = None
    last_success: float | None = None


class SyncMetrics:
    """The metrics of the syncs of ``model_dir`` (a ``prometheus_client`` collector)."""

    def __init__(self, model_dir: str | os.PathLike[str] | None = None) -> None:
        # one spelling per directory, whichever way a run was given it
        self.model_dir = None if model_dir is None else os.path.realpath(model_dir)
        self._c = _Counts()
        self._lock = threading.Lock()  # the HTTP server collects from its own thread
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    # -- what happened ----------------------------------------------------------------

    def observe(self, result: SyncResult) -> None:
        """Adds a sync that ran to its end (changed something or not)."""
        with self._lock:
            if self.model_dir is None:
                self.model_dir = os.path.realpath(result.model_dir)
            c = self._c
            c.syncs["unchanged" if result.generation is None else "changed"] += 1
            c.buckets[_bucket(result.seconds)] += 1
            c.seconds_sum += result.seconds
            for name, (attr, _) in BYTE_COUNTERS.items():
                c.totals[name] += getattr(result, attr)
            if result.recovered:
                c.recoveries += 1
            c.last_sync = c.last_success = time.time()

    def failed(self, *, torn: bool = False) -> None:
        """Adds a sync that raised (``torn``: the producer kept stepping during it)."""
        with self._lock:
            self._c.syncs["torn" if torn else "failed"] += 1
            self._c.last_sync = time.time()

    def producer(self, alive: bool | None) -> None:
        """Whether the producer runs (None: unknown, the gauge is left out)."""
        with self._lock:
            self._c.producer_alive = alive

    # -- the collector ----------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            c = _copy(self._c)
            model_dir = self.model_dir
        label = [model_dir or ""]
        syncs = CounterMetricFamily(
            "apollo_sync_syncs", "syncs by outcome", labels=["model_dir", "outcome"]
        )
        for outcome in OUTCOMES:
            syncs.add_metric([*label, outcome], c.syncs[outcome])
        yield syncs
        hist = HistogramMetricFamily(
            "apollo_sync_sync_seconds",
            "seconds each sync spent diffing and writing (SyncResult.seconds)",
            labels=["model_dir"],
        )
        cumulative, running = [], 0.0
        for bound, n in zip(BUCKETS, c.buckets, strict=True):
            running += n
            cumulative.append(("+Inf" if math.isinf(bound) else repr(bound), running))
        hist.add_metric(label, cumulative, c.seconds_sum)
        yield hist
        for name, (_, doc) in BYTE_COUNTERS.items():
            yield _counter(f"apollo_sync_{name}", doc, label, c.totals[name])
        yield _counter(
            "apollo_sync_recoveries",
            "syncs that first recovered an interrupted sync (a crash or a kill)",
            label,
            c.recoveries,
        )
        if model_dir is not None:
            yield from _directory(model_dir, label)
        if c.producer_alive is not None:
            yield _gauge(
                "apollo_sync_producer_alive",
                "1 while the process that exported the handles runs",
                label,
                1.0 if c.producer_alive else 0.0,
            )
        if c.last_sync is not None:
            yield _gauge(
                "apollo_sync_last_sync_timestamp_seconds",
                "when the last sync ended, whatever its outcome",
                label,
                c.last_sync,
            )
        if c.last_success is not None:
            yield _gauge(
                "apollo_sync_last_success_timestamp_seconds",
                "when the last sync that ran to its end ended",
                label,
                c.last_success,
            )

    # -- where they go ----------------------------------------------------------------

    def serve(self, port: int, addr: str = "127.0.0.1") -> Callable[[], None]:
        """Serves ``/metrics`` on ``addr:port`` from a thread; returns what stops it."""
        server, thread = start_http_server(port, addr=addr, registry=self.registry)

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join()

        return stop

    def write_textfile(self, path: str | os.PathLike[str]) -> None:
        """Writes the metrics for node_exporter's textfile collector (atomically:
        a temporary file renamed over ``path``)."""
        write_to_textfile(str(path), self.registry)

    def load_textfile(self, path: str | os.PathLike[str]) -> None:
        """Takes the counters from a file :meth:`write_textfile` wrote (for the
        same ``model_dir``), so that this process's syncs add to them."""
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            return
        c = _Counts()
        bounds = {("+Inf" if math.isinf(b) else repr(b)): i for i, b in enumerate(BUCKETS)}
        cumulative = [0.0] * len(BUCKETS)
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if self.model_dir is not None and s.labels.get("model_dir") != self.model_dir:
                    continue
                name, v = s.name.removeprefix("apollo_sync_"), s.value
                if name == "syncs_total" and s.labels.get("outcome") in c.syncs:
                    c.syncs[s.labels["outcome"]] = v
                elif name == "sync_seconds_bucket" and s.labels.get("le") in bounds:
                    cumulative[bounds[s.labels["le"]]] = v
                elif name == "sync_seconds_sum":
                    c.seconds_sum = v
                elif name.removesuffix("_total") in c.totals and name.endswith("_total"):
                    c.totals[name.removesuffix("_total")] = v
                elif name == "recoveries_total":
                    c.recoveries = v
                elif name == "last_sync_timestamp_seconds":
                    c.last_sync = v
                elif name == "last_success_timestamp_seconds":
                    c.last_success = v
        c.buckets = [b - a for a, b in zip([0.0, *cumulative[:-1]], cumulative, strict=True)]
        with self._lock:
            self._c = c


@contextlib.contextmanager
def textfile(
    path: str | os.PathLike[str], model_dir: str | os.PathLike[str] | None
) -> Iterator[SyncMetrics]:
    """The metrics of ``path`` (loaded), written back when the block ends, under
    an exclusive ``flock`` of ``<path>.lock``: two one-shot syncs that end at the
    same time do not lose each other's counts."""
    target = Path(path)
    fd = os.open(f"{target}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        metrics = SyncMetrics(model_dir)
        metrics.load_textfile(target)
        try:
            yield metrics
        finally:
            metrics.write_textfile(target)
    finally:
        os.close(fd)


def _bucket(seconds: float) -> int:
    return next(i for i, b in enumerate(BUCKETS) if seconds <= b)


def _copy(c: _Counts) -> _Counts:
    return _Counts(
        dict(c.syncs),
        list(c.buckets),
        c.seconds_sum,
        dict(c.totals),
        c.recoveries,
        c.producer_alive,
        c.last_sync,
        c.last_success,
    )


def _counter(name: str, doc: str, label: list[str], value: float) -> CounterMetricFamily:
    m = CounterMetricFamily(name, doc, labels=["model_dir"])
    m.add_metric(label, value)
    return m


def _gauge(name: str, doc: str, label: list[str], value: float) -> GaugeMetricFamily:
    m = GaugeMetricFamily(name, doc, labels=["model_dir"])
    m.add_metric(label, value)
    return m


def _directory(model_dir: str, label: list[str]) -> Iterator[Metric]:
    """Gauges read from the directory at collection time (so a rollback or a
    prune made by another command shows at the next scrape)."""
    layout = gens.Layout(model_dir)
    try:
        h = gens.history(model_dir)
    except (ApolloSyncError, OSError):
        return  # unreadable now: left out rather than guessed
    sizes = []
    for p in layout.logs().values():
        with contextlib.suppress(FileNotFoundError):
            sizes.append(p.stat().st_size)
    yield _gauge("apollo_sync_generation", "the committed generation", label, h.generation)
    yield _gauge(
        "apollo_sync_checkpoint", "the generation the shards hold on disk", label, h.checkpoint
    )
    yield _gauge(
        "apollo_sync_rollback_points",
        "generations a rollback can restore",
        label,
        len(h.rollback_points()),
    )
    yield _gauge("apollo_sync_log_bytes", "bytes of the XOR-delta logs kept", label, sum(sizes))
