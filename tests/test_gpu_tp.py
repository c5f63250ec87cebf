"""Ranks on several GPUs synced as one producer, one process per GPU.

Each producer process holds its rank's shard (built by :mod:`vllm_sharding` from
the checkpoint, as vLLM's loaders would) in its GPU's memory and exports CUDA IPC
handles through the worker extension; this process (the consumer) syncs all of
them from rank 0's path, and the files must equal the unsharded truth, with the
logits ``from_pretrained`` gives. Run on the 2- and 4-GPU machines with
``python -m pytest tests/test_gpu_tp.py``. With fewer GPUs than ranks, ranks
share the GPUs (on one GPU: every rank a process of its own on GPU 0), which
still proves the CUDA IPC of several producers and the strided copies, but not
the copies of several GPUs running at once.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from apollo_sync import ModelDir, sync
from apollo_sync.ranks import open_handles
from apollo_sync.verify import mismatches
from test_tp import CONFIGS, Worker, changed, check_files, check_logits, make_model, put
from vllm_sharding import shard

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here"),
]


def producer(
    root: str, arch: str, tp: int, pp: int, index: int, handles: str, ep: str | None, conn: Any
) -> None:
    """One vLLM worker: rank ``index``'s shard on GPU ``index`` (modulo the GPUs
    there are: with fewer GPUs than ranks, ranks share them), exported; on
    "train", the changed truth's shard put in place; on "exit", gone."""
    try:
        from test_tp import read_dir

        gpu = index % torch.cuda.device_count()
        torch.cuda.set_device(gpu)
        _, shape = CONFIGS[arch]
        hf = read_dir(Path(root))
        rank = shard(hf, shape, tp, pp=pp, layers=2, ep=ep)[index]
        for p in rank.model.parameters():
            p.data = p.data.to(f"cuda:{gpu}")  # the Parameter (and its attributes) stays
        Worker(Path(root), rank, tp, pp, ep=ep is not None).apollo_export_handles(handles)
        torch.cuda.synchronize()
        conn.send("ready")
        while (msg := conn.recv()) != "exit":
            assert msg == "train"
            put(rank, shard(changed(hf), shape, tp, pp=pp, layers=2, ep=ep)[index])
            torch.cuda.synchronize()
            conn.send("trained")
    except BaseException as e:
        conn.send(f"error: {type(e).__name__}: {e}")
        raise


class Ranks:
    """``tp * pp`` producer processes, one per GPU (or sharing the GPUs there are)."""

    def __init__(
        self, root: Path, arch: str, tp: int, pp: int, handles: Path, ep: str | None
    ) -> None:
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for i in range(tp * pp):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=producer, args=(str(root), arch, tp, pp, i, str(handles), ep, theirs)
            )
            proc.start()
            self.conns.append(mine)
            self.procs.append(proc)
        self.expect("ready")

    def expect(self, word: str) -> None:
        for i, c in enumerate(self.conns):
            if not c.poll(300):
                raise TimeoutError(f"rank {i} did not answer")
            got = c.recv()
            assert got == word, f"rank {i}: {got}"

    def train(self) -> None:
        for c in self.conns:
            c.send("train")
        self.expect("trained")

    def close(self) -> None:
        for c in self.conns:
            c.send("exit")
        for p in self.procs:
            p.join(60)


CASES = [
    ("qwen3", 2, 1, None),
    ("qwen3", 4, 1, None),
    ("qwen3", 2, 2, None),  # two pipeline stages of tensor-parallel 2
    ("qwen3_moe", 4, 1, None),  # 4 ranks > 2 KV heads: K/V replicas on two GPUs each
    ("qwen3_moe", 4, 1, "round_robin"),
    ("qwen3_5", 2, 1, None),
]


@pytest.mark.parametrize(("arch", "tp", "pp", "ep"), CASES)
def test_ranks_on_gpus_sync_to_the_truth(
    tmp_path: Path, arch: str, tp: int, pp: int, ep: str | None
) -> None:
    gpus = min(tp * pp, torch.cuda.device_count())  # fewer GPUs than ranks: shared
    if arch not in CONFIGS:
        pytest.skip(f"this transformers has no {arch}")
    root, hf = make_model(tmp_path, arch)
    handles = tmp_path / "run" / "handles.pt"
    ranks = Ranks(root, arch, tp, pp, handles, ep)
    try:
        with open_handles(handles) as h:
            devices = {
                str(t.device_bytes(0, 0).device)
                for s in (x.source for x in h.tensors.values())
                for t in s.ranks.values()  # type: ignore[union-attr]
            }
            assert len(devices) == gpus  # each rank on its own GPU where there are enough
        assert sync(handles=handles).total_changed == 0
        truth = changed(hf)
        ranks.train()
        t0 = time.perf_counter()
        result = sync(handles=handles)
        seconds = time.perf_counter() - t0
        print(f"{arch} tp {tp} pp {pp} ep {ep}: {result.total_compared} B in {seconds:.3f} s")
        assert result.total_changed > 0 and result.tensors_missing == 0
        check_files(root, truth)
        check_logits(root, truth)
        with open_handles(handles) as h:
            assert mismatches(ModelDir.open(root), h.tensors) == []
        assert sync(handles=handles).total_changed == 0
    finally:
        ranks.close()
