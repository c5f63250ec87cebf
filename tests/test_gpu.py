"""The CUDA path: IPC handles across two processes, pinned staging, merged layouts.

Skipped (with the reason shown) where no CUDA device is present; run on the GPU
machine with ``python -m pytest tests/test_gpu.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from apollo_sync import HandlesError, ModelDir, ProducerGoneError, load_handles, sync
from apollo_sync._core import Syncer
from apollo_sync.demo import Producer, load_live, make_demo_model
from apollo_sync.errors import PlanError
from apollo_sync.handles import device_for_uuid
from apollo_sync.live import from_torch
from apollo_sync.stream import stream_into
from apollo_sync.sync import plan
from apollo_sync.verify import mismatches
from conftest import dir_digest

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


def cli_refused(model: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Runs a sync that must fail; returns its stderr after checking that it
    exited non-zero and left every file of ``model`` as it was."""
    before = dir_digest(model)
    p = subprocess.run(
        [sys.executable, "-m", "apollo_sync", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=dict(os.environ, **(env or {})),
    )
    assert p.returncode != 0, p.stdout
    assert dir_digest(model) == before
    return p.stderr


def rewrite_handles(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edits a handles file (as a producer with other settings would have written
    it), keeping its mode and modification time."""
    st = path.stat()
    obj = torch.load(path, weights_only=False)  # our own file: the tuples, nothing called
    edit(obj)
    torch.save(obj, path)
    os.chmod(path, 0o600)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


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


def test_a_failing_feed_stops_the_stream_and_raises(tmp_path: Path) -> None:
    model = make_demo_model(tmp_path / "model", 16, shards=1)
    live = load_live(model, "cuda")
    md = ModelDir.open(model)
    _, placements = plan(md, {k: from_torch(k, v) for k, v in live.items()})
    syncer = Syncer([(h.path, h.data_start, h.file_len) for h in md.headers], dry_run=True)
    threads = threading.active_count()
    # Out of file order: the core refuses the second batch; the feeder thread's
    # error comes back here, and the thread is gone.
    with pytest.raises(PlanError, match="precedes"):
        stream_into(syncer, placements[::-1], chunk_bytes=1 << 20, depth=2)
    assert threading.active_count() == threads


def test_producer_gone_is_refused_and_nothing_written(tmp_path: Path) -> None:
    model = make_demo_model(tmp_path / "model", 8, shards=1)
    handles = tmp_path / "h" / "handles.pt"
    with Producer(model, handles, device="cuda") as prod:
        prod.step()
    with pytest.raises(ProducerGoneError):
        load_handles(handles)
    assert "has exited" in cli_refused(model, "sync", "--handles", str(handles))


def test_device_chosen_by_uuid_not_by_the_producers_index(tmp_path: Path) -> None:
    visible = ["GPU-aaaa", "GPU-bbbb", "cccc"]
    assert device_for_uuid("GPU-bbbb", visible) == 1
    assert device_for_uuid("bbbb", visible) == 1
    assert device_for_uuid("GPU-CCCC", visible) == 2
    with pytest.raises(HandlesError, match="not visible here"):
        device_for_uuid("GPU-dddd", visible)
    # A producer that numbered this GPU 5 (its CUDA_VISIBLE_DEVICES differs from
    # ours): the handles still open on the GPU with its UUID, and sync.
    model = make_demo_model(tmp_path / "model", 16, shards=2)
    handles = tmp_path / "h" / "handles.pt"
    with Producer(model, handles, device="cuda") as prod:
        prod.step()

        def renumber(obj: dict[str, Any]) -> None:
            for name, entry in obj.items():
                if name != "__metadata__":
                    fn, args = entry["handle"]
                    entry["handle"] = (fn, (*args[:6], 5, *args[7:]))

        rewrite_handles(handles, renumber)
        assert int(cli("sync", "--handles", str(handles))["total_changed"]) > 0  # type: ignore[call-overload]
        with load_handles(handles) as h:
            assert {str(t.device_bytes().device) for t in h.tensors.values()} == {"cuda:0"}
            assert mismatches(ModelDir.open(model), h.tensors) == []


def test_gpu_not_visible_is_refused_and_nothing_written(tmp_path: Path) -> None:
    model = make_demo_model(tmp_path / "model", 8, shards=1)
    handles = tmp_path / "h" / "handles.pt"
    with Producer(model, handles, device="cuda") as prod:
        prod.step()
        err = cli_refused(
            model, "sync", "--handles", str(handles), env={"CUDA_VISIBLE_DEVICES": ""}
        )
        assert "no CUDA device is visible" in err
        rewrite_handles(
            handles, lambda obj: obj["__metadata__"].update(gpu_uuid="GPU-00000000-dead-beef")
        )
        err = cli_refused(model, "sync", "--handles", str(handles))
        assert "GPU-00000000-dead-beef is not visible here" in err


def test_handles_older_than_the_producers_restart_are_refused(tmp_path: Path) -> None:
    model = make_demo_model(tmp_path / "model", 8, shards=1)
    handles = tmp_path / "h" / "handles.pt"
    with Producer(model, handles, device="cuda") as prod:
        prod.step()
    # The restarted producer starts well after the file was written: its start
    # time is known to within 1 s (/proc's boot time is whole seconds), and the
    # check allows 1 s of slack on top, so 1.5 s here was flaky (refused or not
    # by where the boot time's second fell).
    time.sleep(3.5)
    restarted = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        # The same pid now names a process that started later (a producer restarted in
        # a container keeps its pid): by the recorded start time, and, where the file
        # has none (an older writer), by the file's age.
        rewrite_handles(handles, lambda o: o["__metadata__"].update(producer_pid=restarted.pid))
        err = cli_refused(model, "sync", "--handles", str(handles))
        assert "is a different process" in err
        rewrite_handles(handles, lambda o: o["__metadata__"].pop("producer_start"))
        with pytest.raises(ProducerGoneError, match="before the producer"):
            load_handles(handles)
        assert "before the producer" in cli_refused(model, "sync", "--handles", str(handles))
    finally:
        restarted.kill()
        restarted.wait()


def test_expandable_segments_producer_syncs_and_fails_clearly_once_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch opens expandable-segment memory of another process through pidfd_getfd
    (this machine allows it): the sync works. Once the producer is gone, a file
    with no pid to check (the seeds' format) fails to open, with the reason."""
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    model = make_demo_model(tmp_path / "model", 16, shards=2)
    handles = tmp_path / "h" / "handles.pt"
    with Producer(model, handles, device="cuda") as prod:
        monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
        prod.step()
        assert int(cli("sync", "--handles", str(handles))["total_changed"]) > 0  # type: ignore[call-overload]
        with load_handles(handles) as h:
            assert h.metadata["cuda_allocator"] == "expandable_segments"
            assert mismatches(ModelDir.open(model), h.tensors) == []
        prod.step()
    rewrite_handles(
        handles, lambda o: [o["__metadata__"].pop(k) for k in ("producer_pid", "producer_start")]
    )
    err = cli_refused(model, "sync", "--handles", str(handles))
    assert "cannot open CUDA handle" in err and "expandable_segments" in err


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
