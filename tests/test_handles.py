"""Handles files: CPU shared-memory round trip, and every unsafe file refused."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from apollo_sync import (
    HandlesError,
    ProducerGoneError,
    UnsafeHandlesError,
    default_handles_path,
    export_handles,
    load_handles,
)
from conftest import randn


def test_cpu_round_trip_reads_the_producers_memory_live(tmp_path: Path) -> None:
    tensors = {
        "a": randn(64, 33, dtype=torch.bfloat16),
        "b": torch.arange(10, dtype=torch.int32),
        "view": torch.arange(100, dtype=torch.float32)[10:20],  # offset into a storage
        "empty": torch.zeros(0),
    }
    path = export_handles(tensors, tmp_path / "h" / "handles.pt", metadata={"model_path": "/m"})
    assert (path.stat().st_mode & 0o777) == 0o600
    with load_handles(path) as h:
        assert h.metadata["model_path"] == "/m" and h.metadata["producer_pid"] == os.getpid()
        for name, t in tensors.items():
            lt = h.tensors[name]
            assert lt.shape == tuple(t.shape)
            assert np.array_equal(lt.host_bytes(), t.reshape(-1).view(torch.uint8).numpy()), name
        tensors["a"][0, 0] += 1  # the producer steps: the reader sees it, no re-export
        assert np.array_equal(
            h.tensors["a"].host_bytes()[:2], tensors["a"].view(torch.uint8)[0, :2]
        )


def test_planted_malicious_pickle_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    for fmt in ("torch", "raw"):
        path = tmp_path / f"evil_{fmt}.pt"
        if fmt == "torch":
            torch.save({"w": {"handle": Evil()}}, path)
        else:
            path.write_bytes(pickle.dumps({"w": {"handle": Evil()}}))
        path.chmod(0o600)
        with pytest.raises(HandlesError):
            load_handles(path)
        assert not marker.exists()


def test_allowed_global_in_the_wrong_place_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "h.pt"
    torch.save({"w": {"handle": (torch.Tensor, (1,) * 15)}}, path)
    path.chmod(0o600)
    with pytest.raises(UnsafeHandlesError, match="rebuild_cuda_tensor"):
        load_handles(path)


def test_group_writable_file_is_refused(tmp_path: Path) -> None:
    path = export_handles({"a": torch.ones(3)}, tmp_path / "h.pt")
    path.chmod(0o664)
    with pytest.raises(UnsafeHandlesError, match="writable by group or others"):
        load_handles(path)


def test_symlink_is_refused(tmp_path: Path) -> None:
    real = export_handles({"a": torch.ones(3)}, tmp_path / "real.pt")
    link = tmp_path / "link.pt"
    link.symlink_to(real)
    with pytest.raises(UnsafeHandlesError, match="symbolic link"):
        load_handles(link)


def test_world_writable_directory_without_sticky_bit_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir()
    path = export_handles({"a": torch.ones(3)}, d / "h.pt")
    d.chmod(0o777)
    try:
        with pytest.raises(UnsafeHandlesError, match="anyone can write"):
            load_handles(path)
    finally:
        d.chmod(0o700)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
def test_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = export_handles({"a": torch.ones(3)}, tmp_path / "h.pt")
    os.chown(path, 65534, 65534)
    with pytest.raises(UnsafeHandlesError, match="owned by uid 65534"):
        load_handles(path)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(HandlesError, match="no handles file"):
        load_handles(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a handles file")
    bad.chmod(0o600)
    with pytest.raises(HandlesError):
        load_handles(bad)
    torch.save({"w": {"shm": {"name": "x"}}}, bad)
    with pytest.raises(HandlesError, match="malformed"):
        load_handles(bad)
    torch.save([1, 2], bad)
    with pytest.raises(HandlesError, match="dict"):
        load_handles(bad)


def test_producer_gone_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "h.pt"
    code = (
        "import torch, sys; from apollo_sync import export_handles; "
        f"export_handles({{'a': torch.ones(1000)}}, {str(path)!r}, metadata={{'model_path': '/m'}})"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(ProducerGoneError, match="exited"):
        load_handles(path)


def test_default_path_is_private(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("APOLLO_SYNC_HANDLES", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_handles_path() == tmp_path / "apollo_sync" / "weight_handles.pt"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert not str(default_handles_path()).startswith("/tmp/")
    monkeypatch.setenv("APOLLO_SYNC_HANDLES", str(tmp_path / "x.pt"))
    assert default_handles_path() == tmp_path / "x.pt"
    export_handles({"a": torch.ones(2)})
    assert (tmp_path / "x.pt").exists()


def test_seeds_format_cuda_handles_parse_without_running_anything(tmp_path: Path) -> None:
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    args = (
        torch.nn.Parameter,
        torch.Size([4, 8]),
        (8, 1),
        0,
        torch.storage.TypedStorage,
        torch.bfloat16,
        0,
        b"\0" * 64,
        64,
        0,
        False,
        b"ref",
        0,
        b"ev",
        True,
    )
    path = tmp_path / "seeds.pt"
    torch.save({"w": {"handle": (rebuild_cuda_tensor, args)}, "__metadata__": {}}, path)
    path.chmod(0o600)
    if torch.cuda.is_available():
        pytest.skip("with a GPU the fake handle would be opened; covered by test_gpu.py")
    with pytest.raises(HandlesError, match="no CUDA device"):
        load_handles(path)  # structure accepted; stops only for want of a GPU


def test_a_pickle_that_calls_the_rebuild_function_is_refused(tmp_path: Path) -> None:
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    class Sneaky:
        def __reduce__(self) -> tuple[object, tuple[object, ...]]:
            return (rebuild_cuda_tensor, (1,) * 15)

    path = tmp_path / "sneaky.pt"
    torch.save({"w": {"handle": Sneaky()}}, path)
    path.chmod(0o600)
    with pytest.raises(UnsafeHandlesError, match="refused call while unpickling"):
        load_handles(path)


@pytest.mark.parametrize(
    "rec",
    [
        {"name": "x", "size": 8, "offset": 0, "dtype": "F32", "shape": 5},
        {"name": "x", "size": 8, "offset": 0, "dtype": "Q9", "shape": [2]},
        {"name": "x", "size": 8, "offset": 0, "dtype": "F32", "shape": [-1]},
        {"name": "x", "size": 8, "offset": -4, "dtype": "F32", "shape": [1]},
    ],
)
def test_malformed_shared_memory_records_are_handles_errors(tmp_path: Path, rec: dict) -> None:
    path = tmp_path / "h.pt"
    torch.save({"w": {"shm": rec}}, path)
    path.chmod(0o600)
    with pytest.raises(HandlesError):
        load_handles(path)


def test_text_and_random_bytes_are_not_handles(tmp_path: Path) -> None:
    path = tmp_path / "h.pt"
    for data in (b"hello world", os.urandom(4096)):
        path.write_bytes(data)
        path.chmod(0o600)
        with pytest.raises(HandlesError, match="not a handles file"):
            load_handles(path)


def test_live_tensors_refuse_to_stream_after_their_handles_close(tmp_path: Path) -> None:
    live = {"a": torch.ones(5000)}
    path = export_handles(live, tmp_path / "h.pt")
    h = load_handles(path)
    lt = h.tensors["a"]
    fd, _, n = lt.stream_source(0, lt.nbytes)
    assert n == lt.nbytes and fd >= 0
    h.close()
    with pytest.raises(ValueError, match="closed"):
        lt.stream_source(0, lt.nbytes)
