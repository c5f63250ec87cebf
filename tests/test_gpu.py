"""The CUDA path: IPC handles across two processes, pinned staging, merged layouts.

Skipped (with the reason shown) where no CUDA device is present; run on the GPU
machine with ``python -m pytest tests/test_gpu.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apollo_sync import ModelDir, ProducerGoneError, load_handles, sync
from apollo_sync._core import Syncer
from apollo_sync.demo import Producer, load_live, make_demo_model
from apollo_sync.live import from_torch
from apollo_sync.stream import stream_into
from apollo_sync.sync import plan
from apollo_sync.verify import mismatches

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here"),
]


def cli(*args: str) -> dict[str, object]:
    p = subprocess.run(
        [sys.executable, "-m", "apollo_sync", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    out: dict[str, object] = json.loads(p.stdout)
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_two_process_cuda_ipc_round_trip(tmp_path: Path, dtype: torch.dtype) -> None:
    model = make_demo_model(tmp_path / "model", 48, shards=3, dtype=dtype)
    handles = tmp_path / "h" / "handles.pt"
    with Producer(model, handles, device="cuda") as prod:
        first = cli("sync", "--handles", str(handles))
        assert first["total_changed"] == 0
        blocks = prod.step()
        out = cli("sync", "--handles", str(handles))
        assert 0 < int(out["total_changed"]) <= blocks * 4096  # type: ignore[call-overload]
        assert out["bytes_written"] == out["total_changed"]
        with load_handles(handles) as h:
            assert all(t.is_cuda for t in h.tensors.values())
            assert h.metadata["gpu_uuid"] == str(torch.cuda.get_device_properties(0).uuid)
            assert mismatches(ModelDir.open(model), h.tensors) == []
        assert cli("sync", "--handles", str(handles))["total_changed"] == 0


def test_in_process_cuda_tensors_split_and_staged_in_small_chunks(tmp_path: Path) -> None:
    model = make_demo_model(tmp_path / "model", 32, shards=2)
    live = load_live(model, "cuda")
    for t in live.values():
        t.view(-1)[0] += 1
        t.view(-1)[-1] += 1
    md = ModelDir.open(model)
    lt = {k: from_torch(k, v) for k, v in live.items()}
    _, placements = plan(md, lt)
    syncer = Syncer([(h.path, h.data_start, h.file_len) for h in md.headers])
    stream_into(syncer, placements, batch_bytes=3 << 20, chunk_bytes=1 << 20, depth=2)
    reports = syncer.finish()
    assert sum(r.bytes_changed for r in reports) > 0
    assert mismatches(md, lt) == []
    assert sync(model, live).total_changed == 0


def test_producer_gone_is_refused(tmp_path: Path) -> None:
    model = make_demo_model(tmp_path / "model", 8, shards=1)
    handles = tmp_path / "h" / "handles.pt"
    with Producer(model, handles, device="cuda"):
        pass
    with pytest.raises(ProducerGoneError):
        load_handles(handles)


def test_gpu_memory_and_host_memory_stay_small(tmp_path: Path) -> None:
    model = make_demo_model(tmp_path / "model", 256, shards=4)
    live = load_live(model, "cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for t in live.values():
        t.view(-1)[::4096] += 1
    r = sync(model, live)
    assert r.total_changed > 0
    added = torch.cuda.max_memory_allocated() - base
    assert added < 512 << 20, added
    os.sync()
