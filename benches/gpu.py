"""GPU benchmark: apollo_sync against the seed script, a full rewrite and the host's
limits, on a Qwen3.5-27B-shaped slice held on the GPU in vLLM's merged layout.

In one run, per dtype (fp16, then bf16):

* builds ``--layers`` decoder layers with the real Qwen3.5-27B dimensions (hidden
  5120; Gated DeltaNet layers with 16 key / 48 value heads of 128; full attention
  every 4th layer, 24 query heads of 256 doubled for the gate, 4 KV heads;
  intermediate 17408), HF-named, in 4 safetensors shards with an index;
* this process is the producer: it holds the weights on the GPU merged as vLLM
  holds them (``qkv_proj``, ``gate_up_proj``, ``in_proj_qkvz``, ``in_proj_ba``, a
  ``language_model.`` prefix), exports CUDA IPC handles, and flips one bit of one
  element in ``--fraction`` of the shards' 4 KiB blocks;
* measures the limits (once): pinned and pageable device-to-host copies, pinned
  allocation, page-cache reads of the shards, ``memcmp``, read+``memcmp`` and
  mmap+``memcmp`` on 1 and all cores (GIL released: ``preadv`` and ``memcmp`` through
  ctypes), and the disk's rate of random 4 KiB ``O_DIRECT`` writes;
* sweeps the staging parameters of ``stream_into`` on dry runs (nothing written);
* times, each after restoring the shards to their pre-change bytes and page-caching
  them as reading them from disk does (dropped, then read): apollo_sync in a fresh
  consumer process through the handles file; apollo_sync
  on this process's own tensors (twice); the seed script's ``checkpoint_sync`` in a
  fresh process on the same handles file; ``save_file`` of every shard + ``fsync``;
  then apollo_sync as a dry run (and once more on a cache read twice: the second
  pass over a freshly loaded cache costs more than later ones), with ``O_DIRECT``
  writes, and a changed sync right
  after another changed sync (``O_DIRECT`` and page-cache writes: the eviction); then
  two changed syncs by a long-lived consumer (``apollo_sync.watch`` in its own
  process) that this process triggers with a step counter, each into the files and
  cache the previous sync left (a loop of training steps);
* checks the files against the live tensors after each contender and prints a table
  with ratios to the seed and to the limits.

Usage: ``python3 benches/gpu.py [--layers 8] [--dtypes fp16,bf16] [--fraction 0.005]
[--out DIR] [--no-seed] [--no-sweep]``. Needs a CUDA device; the seed script is
found as in ``benches/e2e.py`` (``$APOLLO_SYNC_SEED`` overrides).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import mmap
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # benches/ is not a package: its helpers are shared this way

BLOCK = 4096
N_SHARDS = 4
PIECE = 8 << 20

# Qwen3.5-27B text layers (the seed script's constants, from the model's config).
HIDDEN = 5120
K_HEADS, V_HEADS, K_DIM, V_DIM = 16, 48, 128, 128
CONV_KERNEL = 4
INTER = 17408
ATTN_HEADS, ATTN_KV_HEADS, ATTN_HEAD_DIM = 24, 4, 256
FULL_ATTN_EVERY = 4

_libc = ctypes.CDLL(None, use_errno=True)
_libc.memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_libc.memcmp.restype = ctypes.c_int


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


def layer_tensors(i: int) -> list[tuple[str, tuple[int, ...]]]:
    """HF names and shapes of decoder layer ``i`` (text-only checkpoint naming)."""
    p = f"model.layers.{i}."
    key, value = K_HEADS * K_DIM, V_HEADS * V_DIM
    out: list[tuple[str, tuple[int, ...]]] = [(p + "input_layernorm.weight", (HIDDEN,))]
    if i % FULL_ATTN_EVERY == FULL_ATTN_EVERY - 1:
        q = ATTN_HEADS * ATTN_HEAD_DIM
        kv = ATTN_KV_HEADS * ATTN_HEAD_DIM
        out += [
            (p + "self_attn.q_proj.weight", (2 * q, HIDDEN)),  # doubled: query and gate
            (p + "self_attn.k_proj.weight", (kv, HIDDEN)),
            (p + "self_attn.v_proj.weight", (kv, HIDDEN)),
            (p + "self_attn.o_proj.weight", (HIDDEN, q)),
            (p + "self_attn.q_norm.weight", (ATTN_HEAD_DIM,)),
            (p + "self_attn.k_norm.weight", (ATTN_HEAD_DIM,)),
        ]
    else:
        conv = 2 * key + value
        out += [
            (p + "linear_attn.A_log", (V_HEADS,)),
            (p + "linear_attn.conv1d.weight", (conv, 1, CONV_KERNEL)),
            (p + "linear_attn.dt_bias", (V_HEADS,)),
            (p + "linear_attn.in_proj_qkv.weight", (conv, HIDDEN)),
            (p + "linear_attn.in_proj_z.weight", (value, HIDDEN)),
            (p + "linear_attn.in_proj_b.weight", (V_HEADS, HIDDEN)),
            (p + "linear_attn.in_proj_a.weight", (V_HEADS, HIDDEN)),
            (p + "linear_attn.norm.weight", (V_DIM,)),
            (p + "linear_attn.out_proj.weight", (HIDDEN, value)),
        ]
    out += [
        (p + "post_attention_layernorm.weight", (HIDDEN,)),
        (p + "mlp.gate_proj.weight", (INTER, HIDDEN)),
        (p + "mlp.up_proj.weight", (INTER, HIDDEN)),
        (p + "mlp.down_proj.weight", (HIDDEN, INTER)),
    ]
    return out


def model_tensors(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """HF names and shapes of the slice, in file order."""
    return [t for i in range(layers) for t in layer_tensors(i)] + [("model.norm.weight", (HIDDEN,))]


def build(model_dir: Path, layers: int, dtype: Any, device: str) -> dict[str, Any]:
    """Writes the HF shards (random weights made on the GPU) and returns the live
    tensors merged as vLLM holds them, with where every HF tensor lives in them."""
    import torch
    from safetensors.torch import save_file

    names = [t for i in range(layers) for t in layer_tensors(i)] + [
        ("model.norm.weight", (HIDDEN,))
    ]
    gen = torch.Generator(device=device).manual_seed(1234)
    hf: dict[str, Any] = {}
    for name, shape in names:
        hf[name] = (torch.randn(shape, generator=gen, device=device) * 0.02).to(dtype)
    total = sum(t.nbytes for t in hf.values())
    # Shards of about equal size, in layer order, like a real checkpoint's.
    groups: list[list[str]] = [[]]
    acc = 0
    for name, _ in names:
        if acc >= total / N_SHARDS * len(groups) and len(groups) < N_SHARDS:
            groups.append([])
        groups[-1].append(name)
        acc += hf[name].nbytes
    weight_map: dict[str, str] = {}
    shards = []
    for s, group in enumerate(groups):
        fname = f"model-{s + 1:05d}-of-{len(groups):05d}.safetensors"
        shards.append(fname)
        save_file(
            {n: hf[n].cpu() for n in group}, str(model_dir / fname), metadata={"format": "pt"}
        )
        weight_map |= dict.fromkeys(group, fname)
    (model_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    (model_dir / "config.json").write_text(json.dumps({"model_type": "qwen3_5_text"}))

    live, where = to_vllm(hf, names)
    _sync_device()
    return {"live": live, "where": where, "shards": shards, "total": total, "names": names}


def to_vllm(hf: dict[str, Any], names: list[tuple[str, tuple[int, ...]]]) -> tuple[dict, dict]:
    """The HF tensors merged as vLLM holds them (``hf`` is emptied as they merge), and
    where each HF tensor lives in them: ``name -> (live name, element offset)``."""
    import torch

    from apollo_sync.layouts import MERGED_RULES

    # Each merged module concatenates its parts along rows, under a prefix.
    live: dict[str, Any] = {}
    where: dict[str, tuple[str, int]] = {}  # HF name -> (live name, element offset)
    done: set[str] = set()
    for name, _ in names:
        if name in done:
            continue
        comps = name.split(".")
        fused_parts: list[str] = [name]
        fused_name = name
        for rule in MERGED_RULES:
            if len(comps) > 1 and comps[-2] == rule.parts[0]:
                fused_parts = [".".join([*comps[:-2], p, comps[-1]]) for p in rule.parts]
                fused_name = ".".join([*comps[:-2], rule.fused, comps[-1]])
                break
        live_name = "language_model." + fused_name
        t = torch.cat([hf[p] for p in fused_parts]) if len(fused_parts) > 1 else hf[name]
        live[live_name] = t.contiguous()
        at = 0
        for p in fused_parts:
            where[p] = (live_name, at)
            at += hf[p].numel()
            done.add(p)
            del hf[p]
    return live, where


def perturb(model_dir: Path, info: dict[str, Any], fraction: float, seed: int) -> list[tuple]:
    """Flips the lowest bit of one element in ``fraction`` of each shard's 4 KiB
    blocks, in the live GPU tensors; returns the changed blocks as (shard, offset)."""
    import torch

    rng = random.Random(seed)
    flips: dict[str, list[int]] = {}
    changed: list[tuple] = []
    for fname in info["shards"]:
        path = model_dir / fname
        data_start, header = e2e.header_of(path)
        file_len = path.stat().st_size
        spans = sorted(
            (data_start + v["data_offsets"][0], data_start + v["data_offsets"][1], k, v["dtype"])
            for k, v in header.items()
            if k != "__metadata__"
        )
        first, last = data_start // BLOCK, (file_len - 1) // BLOCK
        chosen = sorted(rng.sample(range(first, last + 1), round((last - first + 1) * fraction)))
        j = 0
        for b in chosen:
            lo, hi = max(b * BLOCK, data_start), min((b + 1) * BLOCK, file_len)
            while spans[j][1] <= lo:
                j += 1
            start, end, name, _ = spans[j]
            size = 2
            first_el = start + -(-(lo - start) // size) * size
            last_el = min(hi, end) - size
            if last_el < first_el:
                continue
            at = first_el + rng.randrange((last_el - first_el) // size + 1) * size
            live_name, base = info["where"][name]
            flips.setdefault(live_name, []).append(base + (at - start) // size)
            changed.append((fname, b * BLOCK))
    for live_name, idx in flips.items():
        v = info["live"][live_name].view(-1).view(torch.int16)
        i = torch.tensor(idx, device=v.device)
        v[i] = v[i] ^ 1
    _sync_device()
    return changed


def restore(model_dir: Path, pristine: Path, shards: list[str], blocks: list[tuple] | None) -> None:
    """Puts the pre-change bytes back (the changed blocks for a sync; ``None``: whole
    files, after a rewrite), page-caches the shards and flushes everything."""
    if blocks is None:
        for f in shards:
            shutil.copyfile(pristine / f, model_dir / f)
        blocks = []
    fds = {}
    try:
        for fname, off in blocks:
            if fname not in fds:
                fds[fname] = (
                    os.open(pristine / fname, os.O_RDONLY),
                    os.open(model_dir / fname, os.O_WRONLY),
                )
            src, dst = fds[fname]
            os.pwrite(dst, os.pread(src, BLOCK, off), off)
    finally:
        for src, dst in fds.values():
            os.fsync(dst)
            os.close(src)
            os.close(dst)
    os.sync()
    # page-cached as reading them from disk leaves them (a server loading the model),
    # whatever the restore's own writes left in the cache
    e2e.drop_cache([model_dir / f for f in shards])
    read_parallel([model_dir / f for f in shards], os.cpu_count() or 1)


def differing_pieces(a: Path, b: Path, shards: list[str]) -> int:
    """8 MiB pieces that differ between two copies of the shards."""
    n = 0
    for f in shards:
        with open(a / f, "rb") as x, open(b / f, "rb") as y:
            while True:
                p, q = x.read(PIECE), y.read(PIECE)
                n += p != q
                if not p and not q:
                    break
    return n


def _sync_device() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------


def pieces_of(paths: list[Path]) -> list[tuple[Path, int, int]]:
    out = []
    for p in paths:
        size = p.stat().st_size
        out += [(p, o, min(PIECE, size - o)) for o in range(0, size, PIECE)]
    return out


def read_parallel(paths: list[Path], threads: int) -> float:
    """Reads the files in 8 MiB pieces on ``threads`` threads; returns GB/s."""
    pieces = pieces_of(paths)
    fds = {p: os.open(p, os.O_RDONLY) for p in paths}
    local = threading.local()

    def one(piece: tuple[Path, int, int]) -> None:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = np.empty(PIECE, dtype=np.uint8)
        os.preadv(fds[piece[0]], [buf[: piece[2]]], piece[1])

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, pieces))
    secs = time.perf_counter() - t0
    for fd in fds.values():
        os.close(fd)
    return sum(n for *_, n in pieces) / secs / 1e9


def host_limits(model_dir: Path, shards: list[str], threads: int) -> dict[str, float]:
    """Page-cache read, memcmp, read+memcmp and mmap+memcmp, 1 and ``threads`` threads.
    The live side is an anonymous host copy of the files (equal bytes: a full scan)."""
    paths = [model_dir / f for f in shards]
    out: dict[str, float] = {}
    for k in sorted({1, threads}):
        read_parallel(paths, k)
        out[f"read_{k}t"] = read_parallel(paths, k)
    live = {p: np.fromfile(p, dtype=np.uint8) for p in paths}
    disk = {p: np.fromfile(p, dtype=np.uint8) for p in paths}
    pieces = pieces_of(paths)
    total = sum(n for *_, n in pieces)
    fds = {p: os.open(p, os.O_RDONLY) for p in paths}
    maps = {}
    for p in paths:
        with open(p, "rb") as f:
            maps[p] = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    mapped = {p: np.frombuffer(m, dtype=np.uint8) for p, m in maps.items()}
    local = threading.local()

    def cmp_mem(piece: tuple[Path, int, int]) -> bool:
        p, o, n = piece
        return _libc.memcmp(live[p][o:].ctypes.data, disk[p][o:].ctypes.data, n) == 0

    def read_cmp(piece: tuple[Path, int, int]) -> bool:
        p, o, n = piece
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = np.empty(PIECE, dtype=np.uint8)
        os.preadv(fds[p], [buf[:n]], o)
        return _libc.memcmp(live[p][o:].ctypes.data, buf.ctypes.data, n) == 0

    def map_cmp(piece: tuple[Path, int, int]) -> bool:
        p, o, n = piece
        return _libc.memcmp(live[p][o:].ctypes.data, mapped[p][o:].ctypes.data, n) == 0

    for label, fn in (("memcmp", cmp_mem), ("read_cmp", read_cmp), ("mmap_cmp", map_cmp)):
        for k in sorted({1, threads}):
            with ThreadPoolExecutor(k) as pool:
                list(pool.map(fn, pieces[: 2 * k]))
                t0 = time.perf_counter()
                same = sum(pool.map(fn, pieces))
                out[f"{label}_{k}t"] = total / (time.perf_counter() - t0) / 1e9
            if same != len(pieces):
                raise RuntimeError(f"limits: {label} found differing pieces in equal bytes")
    for fd in fds.values():
        os.close(fd)
    mapped.clear()
    for m in maps.values():
        m.close()
    return out


def disk_limits(work: Path, writes: int) -> dict[str, float]:
    """Random aligned 4 KiB ``O_DIRECT`` writes per second into a 2 GiB scratch file
    on the shards' filesystem, ``writes`` of them (as many as a sync must make) at
    queue depths 1, 16 and 64 (threads; ``pwrite`` releases the GIL), then fdatasync."""
    path = work / "iops.bin"
    size = 2 << 30
    with open(path, "wb") as f:
        fill = b"\1" * (64 << 20)
        for _ in range(size // len(fill)):
            f.write(fill)
        f.flush()
        os.fsync(f.fileno())
    buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT needs
    buf.write(b"\2" * BLOCK)
    out: dict[str, float] = {}
    try:
        for qd in (1, 16, 64):
            n = min(writes, 1000) if qd == 1 else writes
            offs = [b * BLOCK for b in random.Random(qd).sample(range(size // BLOCK), n)]
            fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
            try:
                t0 = time.perf_counter()
                with ThreadPoolExecutor(qd) as pool:
                    list(pool.map(functools.partial(os.pwrite, fd, buf), offs))
                os.fdatasync(fd)
                out[f"write_iops_qd{qd}"] = n / (time.perf_counter() - t0)
            finally:
                os.close(fd)
    finally:
        path.unlink()
    return out


def gpu_limits(live: dict[str, Any]) -> dict[str, float]:
    """Pinned and pageable device-to-host GB/s, and the cost of pinning host memory."""
    import torch

    out: dict[str, float] = {}
    src = max(live.values(), key=lambda t: t.nbytes).view(-1).view(torch.uint8)
    n = min(src.numel(), 256 << 20)
    stream = torch.cuda.Stream()
    for chunk in (64 << 20, 256 << 20):
        t0 = time.perf_counter()
        dst = torch.empty(chunk, dtype=torch.uint8, pin_memory=True)
        out[f"pin_alloc_{chunk >> 20}MiB_s"] = time.perf_counter() - t0
        m = min(chunk, n)
        with torch.cuda.stream(stream):
            dst[:m].copy_(src[:m], non_blocking=True)  # warm-up
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            reps = max(4, (2 << 30) // m)
            start.record()
            for _ in range(reps):
                dst[:m].copy_(src[:m], non_blocking=True)
            end.record()
        end.synchronize()
        out[f"d2h_pinned_{chunk >> 20}MiB"] = m * reps / (start.elapsed_time(end) / 1e3) / 1e9
        del dst
    big = src[:n]
    big.cpu()
    t0 = time.perf_counter()
    for _ in range(2):
        big.cpu()
    out["d2h_pageable"] = 2 * n / (time.perf_counter() - t0) / 1e9
    return out


# ---------------------------------------------------------------------------
# Contenders
# ---------------------------------------------------------------------------


def child_consumer(spec: dict[str, Any]) -> None:
    """A fresh consumer: open the handles, sync, report (the cron / CLI case)."""
    t0 = time.perf_counter()
    import torch

    import apollo_sync

    if torch.cuda.is_available():
        torch.cuda.init()
    t_import = time.perf_counter() - t0
    rss_imported = _vmrss_kb()
    t1 = time.perf_counter()
    h = apollo_sync.load_handles(spec["handles"])
    t_load = time.perf_counter() - t1
    cuda = torch.cuda.is_available()
    free0 = torch.cuda.mem_get_info()[0] if cuda else 0
    base = torch.cuda.memory_allocated() if cuda else 0
    with PeakSampler(_vmrss_kb) as rss:
        t2 = time.perf_counter()
        r = apollo_sync.sync(handles=h)
        t_sync = time.perf_counter() - t2
    free1 = torch.cuda.mem_get_info()[0] if cuda else 0
    h.close()
    e2e._write_result(
        {
            "import_s": t_import,
            "load_s": t_load,
            **e2e.sync_figures(r, t_sync),
            "gpu_alloc_added": (torch.cuda.max_memory_allocated() - base) if cuda else 0,
            "gpu_free_drop": free0 - free1,
            "rss_after_import_kb": rss_imported,
            "rss_before_sync_kb": rss.base,
            "rss_peak_sync_kb": rss.peak,
            "vm_hwm_kb": _status_kb("VmHWM"),
        }
    )


def child_watcher(spec: dict[str, Any]) -> None:
    """A long-lived consumer (``apollo_sync.watch``): handles opened once, a sync after
    each producer step; appends each sync's figures to the log as a JSON line."""
    import apollo_sync

    mod = sys.modules["apollo_sync.watch"]
    inner = mod.sync

    def timed(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        r = inner(*a, **k)
        with open(spec["log"], "a") as f:
            row = {**e2e.sync_figures(r, time.perf_counter() - t0), "generation": r.generation}
            f.write(json.dumps(row) + "\n")
        return r

    mod.sync = timed
    apollo_sync.watch(handles=spec["handles"], count=spec["count"])


def watched(
    args: argparse.Namespace, work: Path, model_dir: Path, pristine: Path, info: dict[str, Any]
) -> list[dict[str, Any]]:
    """Two changed syncs made by a long-lived consumer, each into the files and page
    cache the previous sync left, as in a loop of training steps. This process is the
    producer: it marks its changes with a step counter, which the consumer waits for."""
    from apollo_sync import StepCounter, export_handles

    counter = StepCounter.create()
    handles = work / "handles" / "watch_handles.pt"
    export_handles(
        info["live"], handles, metadata={"model_path": str(model_dir)}, step_counter=counter
    )
    log = work / "watch.jsonl"
    log.unlink(missing_ok=True)
    spec = work / "spec_watch.json"
    spec.write_text(json.dumps({"handles": str(handles), "log": str(log), "count": 3}))
    restore(model_dir, pristine, info["shards"], [])  # the files equal the live tensors here
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--_spec", str(spec), "--_child", "watcher"]
    )

    def lines(n: int) -> list[dict[str, Any]]:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            got = log.read_text().splitlines() if log.exists() else []
            if len(got) >= n:
                return [json.loads(x) for x in got]
            if proc.poll() is not None:
                raise RuntimeError(f"the watcher exited ({proc.returncode}) after {len(got)}")
            time.sleep(0.01)
        raise RuntimeError(f"the watcher made fewer than {n} syncs in 180 s")

    rows = []
    try:
        lines(1)  # its first sync: nothing changed yet
        for k in range(2):
            with counter.step():
                perturb(model_dir, info, args.fraction, seed=200 + k)
            row = lines(2 + k)[-1]
            row["stale_bytes_after"] = stale_bytes(model_dir, info["live"])
            rows.append(row)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        counter.unlink()
        counter.close()
    return rows


def child_seed(spec: dict[str, Any]) -> None:
    """The seed's ``checkpoint_sync`` on the same handles file, timed in its process."""
    import logging

    logging.basicConfig(level=logging.ERROR)
    e2e.child_seed(spec)


class PeakSampler:
    """Peak of ``read()`` while active, sampled every ``every`` seconds (``base``: its
    value on entry)."""

    def __init__(self, read: Callable[[], int], every: float = 0.002) -> None:
        self.read, self.every = read, every
        self.peak = self.base = read()
        self._done = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self.read())
            time.sleep(self.every)

    def __enter__(self) -> PeakSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._t.join()


def _vmrss_kb() -> int:
    return _status_kb("VmRSS")


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def in_process(model_dir: Path, live: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """apollo_sync on this process's own GPU tensors."""
    import torch

    import apollo_sync

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    free0 = torch.cuda.mem_get_info()[0] if cuda else 0
    before = resource.getrusage(resource.RUSAGE_SELF).ru_oublock
    with PeakSampler(_vmrss_kb) as rss:
        t0 = time.perf_counter()
        r = apollo_sync.sync(model_dir, live, **kw)
        secs = time.perf_counter() - t0
    return {
        **e2e.sync_figures(r, secs),
        "device_bytes": (resource.getrusage(resource.RUSAGE_SELF).ru_oublock - before) * 512,
        "gpu_alloc_added": (torch.cuda.max_memory_allocated() - base) if cuda else 0,
        "gpu_free_drop": (free0 - torch.cuda.mem_get_info()[0]) if cuda else 0,
        "rss_added_kb": rss.peak - rss.base,
    }


def rewrite(model_dir: Path, info: dict[str, Any]) -> dict[str, Any]:
    """``save_file`` of every shard from the live tensors (HF views), then ``fsync``."""
    from safetensors.torch import save_file

    index = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    by_file: dict[str, dict[str, Any]] = {}
    for hf_name, shape in info["names"]:
        live_name, at = info["where"][hf_name]
        n = int(np.prod(shape))
        t = info["live"][live_name].view(-1)[at : at + n].view(shape)
        by_file.setdefault(index[hf_name], {})[hf_name] = t
    before = resource.getrusage(resource.RUSAGE_SELF).ru_oublock
    t0 = time.perf_counter()
    for fname, state in by_file.items():
        path = model_dir / fname
        save_file(state, str(path), metadata={"format": "pt"})
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    secs = time.perf_counter() - t0
    dev = (resource.getrusage(resource.RUSAGE_SELF).ru_oublock - before) * 512
    return {"call_s": secs, "device_bytes": dev}


def stale_bytes(model_dir: Path, live: dict[str, Any]) -> int:
    """Changed-block bytes a dry run still finds (0: the files equal the live tensors)."""
    import apollo_sync

    return int(apollo_sync.sync(model_dir, live, dry_run=True).total_changed)


def verify_independent(model_dir: Path, live: dict[str, Any]) -> int:
    """Tensors whose bytes, as ``safetensors`` loads them, differ from the live ones."""
    from apollo_sync import ModelDir
    from apollo_sync.live import from_torch
    from apollo_sync.verify import mismatches

    return len(mismatches(ModelDir.open(model_dir), {k: from_torch(k, v) for k, v in live.items()}))


def sweep(model_dir: Path, live: dict[str, Any], threads: int) -> list[dict[str, Any]]:
    """Dry runs of ``stream_into`` with other staging sizes and thread counts, and the
    host-only engine (live bytes already in host memory) for reference."""
    from apollo_sync import ModelDir
    from apollo_sync._core import Syncer
    from apollo_sync.live import from_torch
    from apollo_sync.stream import stream_into
    from apollo_sync.sync import plan

    md = ModelDir.open(model_dir)
    lt = {k: from_torch(k, v) for k, v in live.items()}
    _, placements = plan(md, lt)
    specs = [(h.path, h.data_start, h.file_len) for h in md.headers]
    rows = []
    configs = [
        (16 << 20, 8, 0),
        (32 << 20, 6, 0),
        (64 << 20, 4, 0),
        (128 << 20, 2, 0),
        (128 << 20, 4, 0),
        (256 << 20, 2, 0),
        (256 << 20, 3, 0),
        (128 << 20, 2, threads // 2),
    ]
    for chunk, depth, th in configs:
        best = None
        for _ in range(3):
            syncer = Syncer(specs, dry_run=True, threads=th)
            t0 = time.perf_counter()
            st = stream_into(syncer, placements, chunk_bytes=chunk, depth=depth)
            syncer.finish()
            secs = time.perf_counter() - t0
            if best is None or secs < best[0]:
                best = (secs, st)
        secs, st = best
        rows.append(
            {
                "config": f"chunk {chunk >> 20} MiB x{depth}, threads {th or 'auto'}",
                "seconds": secs,
                "gbps": st.bytes / secs / 1e9,
                "setup_s": st.setup_s,
                "copy_wait_s": st.copy_wait_s,
                "feed_s": st.feed_s,
                "submit_s": st.submit_s,
                "batches": st.batches,
            }
        )
        print(f"  sweep {rows[-1]}", flush=True)
    # Host engine: the same bytes already in (pageable) host memory.
    host = {k: v.cpu() for k, v in live.items()}
    ht = {k: from_torch(k, v) for k, v in host.items()}
    _, hp = plan(md, ht)
    for th in (0,):
        best_s = None
        for _ in range(3):
            syncer = Syncer(specs, dry_run=True, threads=th)
            t0 = time.perf_counter()
            st = stream_into(syncer, hp)
            syncer.finish()
            secs = time.perf_counter() - t0
            best_s = secs if best_s is None else min(best_s, secs)
        rows.append(
            {
                "config": f"host memory (no GPU), threads {th or 'auto'}",
                "seconds": best_s,
                "gbps": st.bytes / best_s / 1e9,
            }
        )
        print(f"  sweep {rows[-1]}", flush=True)
    del host, ht, hp
    _sync_device()
    return rows


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def run_dtype(
    args: argparse.Namespace, dtype_name: str, work: Path, lim: dict[str, float] | None
) -> dict[str, Any]:
    import torch

    from apollo_sync import export_handles

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    threads = os.cpu_count() or 1
    model_dir, pristine = work / "model", work / "pristine"
    for d in (model_dir, pristine):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    t0 = time.perf_counter()
    info = build(model_dir, args.layers, dtype, args.device)
    for f in info["shards"]:
        shutil.copyfile(model_dir / f, pristine / f)
    os.sync()
    total = info["total"]
    print(
        f"[{dtype_name}] built {len(info['names'])} HF tensors / {len(info['live'])} live, "
        f"{total / 1e9:.3f} GB in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    out: dict[str, Any] = {
        "dtype": dtype_name,
        "total_bytes": total,
        "tensors_hf": len(info["names"]),
        "tensors_live": len(info["live"]),
    }
    if lim is None:
        restore(model_dir, pristine, info["shards"], [])
        lim = host_limits(model_dir, info["shards"], threads)
        lim |= disk_limits(work, round(total / BLOCK * args.fraction))
        if args.device == "cuda":
            lim |= gpu_limits(info["live"])
        print(f"limits: {json.dumps({k: round(v, 4) for k, v in lim.items()})}", flush=True)
        out["limits"] = lim
    blocks = perturb(model_dir, info, args.fraction, seed=42)
    out["changed_blocks"] = len(blocks)
    print(
        f"[{dtype_name}] changed {len(blocks)} blocks ({len(blocks) * BLOCK / 1e6:.2f} MB)",
        flush=True,
    )
    handles = work / "handles" / "weight_handles.pt"
    export_handles(info["live"], handles, metadata={"model_path": str(model_dir)})
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps({"handles": str(handles), "model_dir": str(model_dir)}))
    me = [sys.executable, os.path.abspath(__file__), "--_spec", str(spec_path), "--_child"]

    if args.sweep and "limits" in out:  # once, on the first dtype
        restore(model_dir, pristine, info["shards"], [])
        out["sweep"] = sweep(model_dir, info["live"], threads)

    runs: dict[str, dict[str, Any]] = {}

    def record(name: str, r: dict[str, Any], restored: list[tuple]) -> None:
        r["stale_bytes_after"] = stale_bytes(model_dir, info["live"])
        runs[name] = r
        print(f"[{dtype_name}] {name}: {json.dumps(r, default=str)}", flush=True)
        restore(model_dir, pristine, info["shards"], restored)

    restore(model_dir, pristine, info["shards"], [])
    # A warm-up no-change sync is not wanted: every contender starts from the same state.
    r = e2e.run_child([*me, "consumer"])
    r["verified_mismatches"] = verify_independent(model_dir, info["live"])
    record("apollo (fresh process)", r, blocks)
    for rep in range(2):
        r = in_process(model_dir, info["live"])
        if rep == 0:
            r["verified_mismatches"] = verify_independent(model_dir, info["live"])
        record(f"apollo (in-process){' #2' if rep else ''}", r, blocks)
    if args.seed:
        record("seed (call)", e2e.run_child([*me, "seed"]), blocks)
    record("full rewrite", rewrite(model_dir, info), None)
    left = differing_pieces(model_dir, pristine, info["shards"])
    if left:
        raise RuntimeError(f"restore left {left} pieces different from the pristine shards")
    # That check read every byte once more: load the shards again, so that the dry
    # run, like every other row, is the first pass after a load (a second pass over
    # a freshly read cache is 10-50% slower than a third: benches/probes/after_restore.py).
    restore(model_dir, pristine, info["shards"], [])
    # What bounds a sync: the same sync writing nothing, and the writes done with
    # O_DIRECT instead of through the page cache.
    record("apollo dry run", in_process(model_dir, info["live"], dry_run=True), [])
    read_parallel([model_dir / f for f in info["shards"]], threads)
    record("apollo dry run, 2nd pass", in_process(model_dir, info["live"], dry_run=True), [])
    record("apollo O_DIRECT writes", in_process(model_dir, info["live"], direct_io=True), blocks)
    # A changed sync right after another one, with no re-caching in between: O_DIRECT
    # writes evict the folios they touch, page-cache writes do not. Each sync below
    # syncs a fresh 0.5% of blocks (the live tensors change again), so nothing is
    # restored after them.
    for n, (label, direct) in enumerate((("O_DIRECT", True), ("page cache", False))):
        perturb(model_dir, info, args.fraction, seed=100 + 2 * n)
        in_process(model_dir, info["live"], direct_io=direct)
        perturb(model_dir, info, args.fraction, seed=101 + 2 * n)
        r = in_process(model_dir, info["live"], direct_io=direct)
        r["stale_bytes_after"] = stale_bytes(model_dir, info["live"])
        runs[f"next sync, {label}"] = r
        print(f"[{dtype_name}] next sync, {label}: {json.dumps(r)}", flush=True)
    for k, row in enumerate(watched(args, work, model_dir, pristine, info)):
        runs[f"watch, sync {k + 2}"] = row
        print(f"[{dtype_name}] watch, sync {k + 2}: {json.dumps(row)}", flush=True)
    out["runs"] = runs
    info.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def table(res: dict[str, Any], lim: dict[str, float], threads: int) -> str:
    total = res["total_bytes"]
    runs = res["runs"]
    seed = runs.get("seed (call)", {})
    seed_ok = seed and seed["stale_bytes_after"] == 0
    seed_s = seed.get("child", {}).get("call_s") if seed else None
    rewrite_s = runs["full rewrite"]["call_s"]
    iops = lim.get("write_iops_qd16", float("nan"))
    read_lim = lim[f"read_{threads}t"]
    d2h = lim.get("d2h_pinned_64MiB", float("nan"))
    cmp_lim = max(lim[f"read_cmp_{threads}t"], lim[f"mmap_cmp_{threads}t"])
    lines = [
        f"{total / 1e9:.2f} GB {res['dtype']}, {res['changed_blocks']} blocks changed "
        f"({res['changed_blocks'] * BLOCK / 1e6:.2f} MB); limits: pinned D2H "
        f"{d2h:.1f} GB/s, page-cache read {read_lim:.1f}, read+cmp {cmp_lim:.1f}, "
        f"disk {iops / 1e3:.1f}k random 4 KiB writes/s (QD16)",
        f"{'contender':<24} {'seconds':>8} {'GB/s':>6} {'changed':>10} {'written':>10} "
        f"{'device':>10} {'disk':>10} {'x seed':>7} {'x rewr':>7} {'/read':>6} {'/D2H':>6} "
        f"{'stale':>9}",
    ]
    lines.append("-" * len(lines[-1]))
    for name, r in runs.items():
        c = r.get("child", r)
        if "call_s" not in c:
            lines.append(f"{name:<24} failed (rc {r.get('returncode')})")
            continue
        secs = c["call_s"]
        gbps = total / secs / 1e9
        dev = r.get("device_bytes")
        chg = c.get("total_changed")
        wr = c.get(
            "bytes_written",
            chg if name.startswith("seed") else total if "rewrite" in name else None,
        )
        xs = f"{seed_s / secs:7.1f}" if seed_ok and seed_s else "      -"
        lines.append(
            f"{name:<24} {secs:8.3f} {gbps:6.2f} {e2e.fmt_bytes(chg):>10} {e2e.fmt_bytes(wr):>10} "
            f"{e2e.fmt_bytes(dev):>10} {e2e.fmt_bytes(c.get('disk_bytes_written')):>10} "
            f"{xs} {rewrite_s / secs:7.1f} {gbps / read_lim:6.2f} "
            f"{gbps / d2h:6.2f} {e2e.fmt_bytes(r['stale_bytes_after']):>9}"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--fraction", type=float, default=0.005)
    ap.add_argument("--out", type=Path, help="write the numbers (JSON) and the table here")
    ap.add_argument("--no-seed", dest="seed", action="store_false")
    ap.add_argument("--no-sweep", dest="sweep", action="store_false")
    ap.add_argument("--workdir", type=Path, help="where the shards go (default: a temp dir)")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of the flow (no GPU rows)")
    ap.add_argument("--_child", choices=["consumer", "seed", "watcher"], help=argparse.SUPPRESS)
    ap.add_argument("--_spec", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        spec = json.loads(args._spec.read_text())
        {"consumer": child_consumer, "seed": child_seed, "watcher": child_watcher}[args._child](
            spec
        )
        return 0
    import torch

    threads = os.cpu_count() or 1
    card = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    work = Path(tempfile.mkdtemp(prefix="apollo_gpu_", dir=args.workdir))
    results: dict[str, Any] = {
        "card": card,
        "cores": threads,
        "torch": torch.__version__,
        "dtypes": [],
    }
    lim: dict[str, float] | None = None
    tables = []
    try:
        for name in args.dtypes.split(","):
            res = run_dtype(args, name, work, lim)
            lim = lim or res["limits"]
            results["dtypes"].append(res)
            tables.append(table(res, lim, threads))
            print("\n" + tables[-1] + "\n", flush=True)
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "gpu_bench.json").write_text(json.dumps(results, indent=1, default=str))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = f"{card}, {threads} host cores, torch {torch.__version__}\n\n" + "\n\n".join(tables)
    print(text)
    if args.out:
        (args.out / "gpu_bench.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
