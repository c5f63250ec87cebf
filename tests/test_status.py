"""``apollo-sync status``: read from a directory that real syncs, a killed sync
and a producer left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import apollo_sync
from apollo_sync import journal as gens
from apollo_sync.status import render, status
from conftest import randn

Factory = Callable[..., Path]


def layers(n: int = 4) -> dict[str, torch.Tensor]:
    return {f"model.layers.{i}.mlp.up_proj.weight": randn(128, 256, seed=i) for i in range(n)}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(
        [sys.executable, "-m", "apollo_sync", *args], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    return p


def test_status_after_real_syncs(model_factory: Factory, tmp_path: Path) -> None:
    live = layers()
    root = model_factory(live)
    results = []
    for n in range(3):
        live[f"model.layers.{n}.mlp.up_proj.weight"][:, n::7] += 1
        results.append(apollo_sync.sync(root, live))
    unchanged = apollo_sync.sync(root, live)
    assert unchanged.generation is None
    gens.wait_flushes(gens.Layout(root))  # this process's background flushes
    st = status(root, handles=tmp_path / "no-handles.pt")
    assert (st.generation, st.checkpoint) == (3, 3)
    assert st.awaiting_recovery == [] and st.not_durable == [] and st.writer is None
    # the log bytes are the files' sizes, and each is what its sync reported
    files = sorted(gens.Layout(root).log_dir.glob("*.xlog"))
    assert st.log_files == len(files) == 3
    assert st.log_bytes == sum(p.stat().st_size for p in files) == sum(r.log_bytes for r in results)
    assert st.log_budget == (root / "model.safetensors").stat().st_size // 2
    assert st.rollback_points == [2, 1, 0]
    assert st.last_generation is not None and st.last_generation.number == 3
    assert st.last_generation.bytes_changed == results[-1].total_changed
    last = st.last_sync
    assert last is not None and last["generation"] is None  # the sync that found nothing
    assert last["bytes_compared"] == unchanged.total_compared
    assert last["seconds"] == unchanged.seconds <= last["wall_seconds"]
    assert last["stages"]["feed"] > 0 and last["stages"]["barriers"] == 0  # nothing held
    assert st.producer is not None and st.producer.alive is False
    screen = render(st)
    assert "generation       3 (sync" in screen and "interrupted      none" in screen
    assert "rollback points  3: generations 0..2" in screen
    assert "last sync" in screen and "no change" in screen
    assert "its stages     feed " in screen and "finish " in screen
    assert "last change      generation 3" in screen
    assert "producer         not running" in screen
    out = json.loads(cli("status", "--model-dir", str(root), "--json").stdout)
    assert out["generation"] == 3 and out["log_bytes"] == st.log_bytes
    assert out["last_sync"]["bytes_compared"] == unchanged.total_compared


def test_status_shows_a_writer_holding_the_lock(model_factory: Factory) -> None:
    live = layers(2)
    root = model_factory(live)
    live["model.layers.0.mlp.up_proj.weight"][0, 0] += 1
    apollo_sync.sync(root, live)
    with gens.ModelLock(root):
        held = status(root, look_for_producer=False)
    assert held.writer is not None and f"pid {os.getpid()}" in held.writer
    assert status(root, look_for_producer=False).writer is None


@pytest.mark.skipif(not apollo_sync._core.FAULTS, reason="needs the fault-injection build")
def test_status_shows_an_interrupted_sync_until_it_is_recovered(
    model_factory: Factory, tmp_path: Path
) -> None:
    live = layers()
    root = model_factory(live)
    live["model.layers.0.mlp.up_proj.weight"][0, 0] += 1
    apollo_sync.sync(root, live)
    for t in live.values():
        t[::2, ::3] += 1
    path = tmp_path / "live.safetensors"
    save_file(live, str(path))
    child = (
        "import sys, apollo_sync; from safetensors.torch import load_file; "
        "apollo_sync.sync(sys.argv[1], load_file(sys.argv[2]))"
    )
    p = subprocess.run(
        [sys.executable, "-c", child, str(root), str(path)],
        env={**os.environ, "APOLLO_SYNC_CRASH_AT": "write:2"},
        timeout=120,
    )
    assert p.returncode == -signal.SIGKILL
    st = status(root, look_for_producer=False)
    assert st.generation == 1 and st.awaiting_recovery == [2]
    assert "INTERRUPTED      generation(s) [2] await recovery" in render(st)
    apollo_sync.recover(root)
    assert status(root, look_for_producer=False).awaiting_recovery == []


def test_status_tells_whether_the_producer_runs(model_factory: Factory, tmp_path: Path) -> None:
    live = layers(2)
    root = model_factory(live)
    mine = tmp_path / "run" / "mine.pt"
    apollo_sync.export_handles(live, path=mine, metadata={"model_path": str(root)})
    st = status(root, handles=mine)
    assert st.producer is not None and st.producer.alive is True
    assert st.notes == []
    # a producer that exported and exited
    gone = tmp_path / "run" / "gone.pt"
    code = (
        "import sys, torch, apollo_sync; "
        "apollo_sync.export_handles({'w': torch.zeros(4)}, path=sys.argv[1], "
        "metadata={'model_path': '/elsewhere'})"
    )
    subprocess.run([sys.executable, "-c", code, str(gone)], check=True, timeout=120)
    st = status(root, handles=gone)
    assert st.producer is not None and st.producer.alive is False
    assert "has exited" in st.producer.detail
    assert st.notes == ["the handles' producer serves /elsewhere, not this directory"]
    # the command line finds the model directory through the handles
    out = cli("status", "--handles", str(mine)).stdout
    assert f"model dir        {root}" in out and "producer         alive" in out
