"""Prometheus metrics: a scrape parses, and its numbers are those of the
``SyncResult`` s of real syncs (in process, from cron-style one-shot runs through
a textfile, and from ``apollo-sync watch`` over HTTP)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import apollo_sync
from apollo_sync import SyncResult
from apollo_sync import journal as gens
from apollo_sync.demo import Producer, make_demo_model
from apollo_sync.metrics import BUCKETS, SyncMetrics
from conftest import randn
from watching import watch_process

Factory = Callable[..., Path]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, by name and labels (parsing it is the first check)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(
    scrape: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    hits = [
        v
        for (n, ls), v in scrape.items()
        if n == name and all((k, w) in ls for k, w in labels.items())
    ]
    assert len(hits) == 1, (name, labels, hits)
    return hits[0]


def check_against(
    scrape: dict[tuple[str, tuple[tuple[str, str], ...]], float],
    results: list[SyncResult] | list[dict[str, object]],
    model_dir: Path,
) -> None:
    """The counters are the sums of the results; the gauges what the directory says."""
    rs = [r if isinstance(r, dict) else r.to_dict() for r in results]
    md = {"model_dir": str(model_dir)}
    changed = sum(1 for r in rs if r["generation"] is not None)
    assert value(scrape, "apollo_sync_syncs_total", outcome="changed", **md) == changed
    assert value(scrape, "apollo_sync_syncs_total", outcome="unchanged", **md) == len(rs) - changed
    for name, key in [
        ("bytes_compared", "total_compared"),
        ("bytes_changed", "total_changed"),
        ("bytes_logged", "log_bytes"),
        ("bytes_written", "bytes_written"),
        ("elements_changed", "elements_changed"),
    ]:
        assert value(scrape, f"apollo_sync_{name}_total", **md) == sum(r[key] for r in rs), name  # type: ignore[misc]
    seconds = [float(r["seconds"]) for r in rs]  # type: ignore[arg-type]
    assert value(scrape, "apollo_sync_sync_seconds_count", **md) == len(rs)
    assert value(scrape, "apollo_sync_sync_seconds_sum", **md) == pytest.approx(sum(seconds))
    for bound in BUCKETS:
        le = "+Inf" if math.isinf(bound) else repr(bound)
        want = sum(1 for s in seconds if s <= bound)
        assert value(scrape, "apollo_sync_sync_seconds_bucket", le=le, **md) == want
    h = gens.history(model_dir)
    assert value(scrape, "apollo_sync_generation", **md) == h.generation
    assert value(scrape, "apollo_sync_rollback_points", **md) == len(h.rollback_points())
    logs = sum(p.stat().st_size for p in gens.Layout(model_dir).logs().values())
    assert value(scrape, "apollo_sync_log_bytes", **md) == logs


def test_a_scrape_adds_up_the_sync_results(model_factory: Factory) -> None:
    live = {f"model.layers.{i}.mlp.up_proj.weight": randn(128, 256, seed=i) for i in range(3)}
    root = model_factory(live)
    metrics = SyncMetrics(root)
    results = []
    for n in range(4):
        if n != 2:  # the third finds nothing to do
            live[f"model.layers.{n % 3}.mlp.up_proj.weight"][:, n::5] += 1
        results.append(apollo_sync.sync(root, live, keep=2))
        metrics.observe(results[-1])
    metrics.failed(torn=True)
    metrics.producer(True)
    scrape = samples(generate_latest(metrics.registry).decode())
    check_against(scrape, results, root)
    assert gens.history(root).rollback_points() == [2, 1]  # keep=2 pruned one
    assert value(scrape, "apollo_sync_syncs_total", outcome="torn") == 1
    assert value(scrape, "apollo_sync_syncs_total", outcome="failed") == 0
    assert value(scrape, "apollo_sync_producer_alive") == 1
    assert value(scrape, "apollo_sync_recoveries_total") == 0


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(
        [sys.executable, "-m", "apollo_sync", *args],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    if check:
        assert p.returncode == 0, p.stderr
    return p


def test_one_shot_syncs_keep_counting_in_the_textfile(tmp_path: Path) -> None:
    model = make_demo_model(tmp_path / "model", size_mb=8, shards=2)
    handles = tmp_path / "run" / "handles.pt"
    prom = tmp_path / "textfile" / "apollo_sync.prom"
    prom.parent.mkdir()
    results = []
    with Producer(model, handles, fraction=0.01) as prod:
        for n in range(3):
            if n:
                prod.step()
            args = ("sync", "--handles", str(handles), "--json", "--metrics-textfile", str(prom))
            results.append(json.loads(cli(*args).stdout))
            scrape = samples(prom.read_text())
            check_against(scrape, results, model)
            assert value(scrape, "apollo_sync_producer_alive") == 1
        success = value(scrape, "apollo_sync_last_success_timestamp_seconds")
        with gens.ModelLock(model):  # another writer: the next one gives up
            p = cli(*args, "--lock-timeout", "0", check=False)
        assert p.returncode == 1 and "LockedError" in p.stderr
        scrape = samples(prom.read_text())
        check_against(scrape, results, model)  # the failure added no bytes
        assert value(scrape, "apollo_sync_syncs_total", outcome="failed") == 1
        assert value(scrape, "apollo_sync_last_success_timestamp_seconds") == success
        assert value(scrape, "apollo_sync_last_sync_timestamp_seconds") > success
        assert value(scrape, "apollo_sync_producer_alive") == 1
    p = cli(*args, check=False)  # the producer has exited
    assert p.returncode == 1 and "ProducerGoneError" in p.stderr
    scrape = samples(prom.read_text())
    check_against(scrape, results, model)
    assert value(scrape, "apollo_sync_syncs_total", outcome="failed") == 2
    assert value(scrape, "apollo_sync_producer_alive") == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_watch_serves_metrics_equal_to_its_results(tmp_path: Path) -> None:
    model = make_demo_model(tmp_path / "model", size_mb=8, shards=2)
    handles = tmp_path / "run" / "handles.pt"
    port = free_port()
    args = ("--handles", str(handles), "--json", "--interval", "3600", "--metrics-port", str(port))
    with (
        Producer(model, handles, fraction=0.01, step_counter=True) as prod,
        watch_process(*args) as w,
    ):
        assert w.stdout is not None
        results = [json.loads(w.stdout.readline())]
        for _ in range(2):
            prod.step()
            results.append(json.loads(w.stdout.readline()))
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
                scrape = samples(r.read().decode())
            check_against(scrape, results, model)
            assert value(scrape, "apollo_sync_producer_alive") == 1
        assert [r["generation"] for r in results] == [None, 1, 2]
        w.terminate()  # SIGTERM: ends cleanly
        assert w.wait(timeout=60) == 0
