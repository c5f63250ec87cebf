"""Training benchmark: apollo_sync on the change pattern real optimizer steps make.

A real step on bf16 weights changes few elements (an update smaller than half a
bf16 ulp rounds away) but they are spread everywhere, so nearly every 4 KiB
block holds one. ``benches/e2e.py`` and ``benches/gpu.py`` perturb 0.5% of the
blocks instead; this bench trains a model and syncs after every step.

What it does:

1. Builds a ``transformers`` Qwen3 model (``Qwen3ForCausalLM``, untied LM head,
   head_dim 128, ``hidden/64`` heads, half as many KV heads) from ``--hidden``,
   ``--layers`` (or ``--size-gb``, which picks the layers), ``--intermediate``,
   ``--vocab``; bf16 on ``--device``; matrices N(0, 0.02) from ``--seed``, norms 1.
2. For each optimizer (``--optimizers``: ``adamw`` = ``torch.optim.AdamW``;
   ``apollo`` / ``apollo-mini`` = the ``apollo-torch`` package, rank
   ``--apollo-rank`` channel-scaled / rank 1 tensor-scaled with scale 128, on the
   attention and MLP matrices, AdamW elsewhere; all without weight decay) and
   each ``--lr``: the model is built again from the seed and saved with
   ``save_pretrained`` (``--shard-gb``) into a fresh directory of its own under
   ``--dir`` (identical bytes each run: checked), so every run starts from the same
   weights with an empty history (re-saved, not rolled back). Then ``--steps``
   times: one forward/backward/``step`` on a random batch (``--batch`` x ``--seq``
   tokens), the parameters updated in place in bf16 (no fp32 master copy, as a
   training worker holds them over vLLM's memory), and after it:

   * **floor**: one pass outside the engine over every live byte (see below);
   * **dry run**: ``apollo_sync.sync(dir, tensors=model.state_dict(), dry_run=True)``;
   * **sync**: ``apollo_sync.sync(dir, tensors=model.state_dict())`` (journaled,
     ``--undo-budget`` / ``--keep`` / ``--threads`` passed through); its
     ``seconds``, ``total_changed``, ``disk_bytes_written`` (the block device's
     counter; n/a on tmpfs/overlay), ``log_bytes`` and ``elements_changed``,
     checked against the floor's count (as its block count is checked against the
     sum of ``files[].blocks_changed``); then the background flush of the shards
     is waited for, timed, and the disk's counter read again: what the disk
     received for the sync in all (the log, then the changed blocks);
   * a fingerprint of the directory (blake2b of each shard) for the new generation.

3. At the end of a run: one more floor pass, which must find no difference (the
   files equal the live weights); the rollback depth from ``apollo_sync.history``
   (generations reachable: every later one keeps its log); a rollback to
   the deepest reachable generation, timed, and the shards' fingerprints checked
   against those recorded at that generation; a full rewrite,
   ``safetensors.torch.save_file`` of the same state dict to a file in the same
   directory, timed, then its ``fsync`` timed, then deleted. The run's directory is
   deleted unless ``--keep-files``.

The floor pass. The shards' headers come from ``apollo_sync.ModelDir``; each live
tensor (``model.state_dict()``, matched by name, dtype and byte size checked) is
cut into chunks of ``CHUNK`` bytes (2 MiB on CPU, 8 MiB on CUDA), and a pool of
``--threads`` threads (default: one per core) takes the chunks in file order,
each thread with its own buffers, allocated (and pinned) before the pass. Per
chunk a thread ``preadv``s the file's bytes at the tensor's offset into its file
buffer, placed so that buffer positions and the file share the 4 KiB grid; on
CUDA it copies the live chunk into its pinned buffer (on CPU the parameter's
bytes are used where they are); then it XORs live and file bytes into its XOR
buffer (numpy, which releases the GIL). That is the floor, timed: every live
byte reaches host memory once and every file byte is read once (from the page
cache: the files are cached, as they are for the sync); nothing stops early.
A second, untimed pass does the same and also counts, with torch ops at the
dtype's width, the nonzero elements (changed elements) and the 4 KiB blocks
holding a nonzero 64-bit word (block indices ORed into one bitmap per shard, so
a block shared by two tensors counts once). The sync is judged against the
timed pass: sync <= 4x floor on CPU, <= 3x on GPU (the table marks the steps
over it with "!"). A last pass after the last sync must count nothing.

Memory: the model, its gradients and the optimizer state are the run's (AdamW:
4x the model's bytes in all, APOLLO about 2x). The bench adds two buffers of
``CHUNK`` + 8 KiB per floor thread (and a pinned third on CUDA), a 4 MiB
read buffer per fingerprint thread, and a bitmap of one byte per 4 KiB of the
files: no full-model copy. The exception is the full-rewrite baseline:
``save_file`` serializes the whole state dict to host bytes first, one model-size
copy, for the length of that call (as it does for any user of it).

Usage::

    python benches/train.py --size-gb 0.2 --steps 2 --optimizers adamw,apollo
    python benches/train.py --device cuda --size-gb 16 --shard-gb 5 --json out.json \\
        --undo-budget 40G

(``--batch`` / ``--seq`` default to 4 x 512 on CUDA, 2 x 256 on CPU; an Adam-like
step's size barely depends on the batch, so the pattern barely does, except in
the input embedding, whose rows change only for tokens in the batch: the default
``--vocab`` 8192 keeps it to a few percent of a small model, as in real ones.)
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import queue
import resource
import shutil
import sys
import tempfile
import time
import types
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import transformers

import apollo_sync
from apollo_sync.journal import Layout, wait_flushes
from apollo_sync.sync import _disk_sectors_written

BLOCK = 4096
#: Floor chunk bytes: small on CPU (the buffers stay in cache), larger D2H copies on CUDA.
CHUNK = {"cpu": 2 << 20, "cuda": 8 << 20}
FINGERPRINT_READ = 4 << 20
#: Sync time over floor time allowed, by device type.
RATIO_LIMIT = {"cpu": 4.0, "cuda": 3.0}
#: The integer type of each element width, to XOR and count at the dtype's width.
WIDTH_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
HEAD_DIM = 128
INIT_STD = 0.02


# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """Bytes from ``123``, ``1.5G``, ``300M``, ``64K`` (powers of 1024)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=3072)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 4)")
    p.add_argument("--size-gb", type=float, default=None, help="pick --layers for this size")
    p.add_argument("--shard-gb", type=float, default=None, help="shard size (default: one file)")
    p.add_argument("--dir", type=Path, default=None, help="work dir (default: a temp dir)")
    p.add_argument("--keep-files", action="store_true", help="keep each run's model dir")
    p.add_argument("--optimizers", default="adamw,apollo", help="adamw,apollo,apollo-mini")
    p.add_argument("--lr", default="1e-5,1e-6", help="learning rates, comma-separated")
    p.add_argument("--apollo-rank", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="sync and floor threads (0: auto)")
    p.add_argument("--undo-budget", type=parse_size, default=None, help="e.g. 4G (sync)")
    p.add_argument("--keep", type=int, default=None, help="generations kept (sync)")
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    args = p.parse_args(argv)
    if args.layers is not None and args.size_gb is not None:
        p.error("give --layers or --size-gb, not both")
    cuda = args.device.startswith("cuda")
    args.batch = args.batch or (4 if cuda else 2)
    args.seq = args.seq or (512 if cuda else 256)
    args.optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    unknown = set(args.optimizers) - set(OPTIMIZERS)
    if unknown:
        p.error(f"unknown optimizer(s) {sorted(unknown)}; choose from {sorted(OPTIMIZERS)}")
    args.lr = [float(x) for x in args.lr.split(",") if x.strip()]
    return args


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


def qwen3_config(args: argparse.Namespace, layers: int) -> transformers.Qwen3Config:
    heads = max(1, args.hidden // 64)
    return transformers.Qwen3Config(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=HEAD_DIM,
        vocab_size=args.vocab,
        tie_word_embeddings=False,
        max_position_embeddings=max(args.seq, 2048),
    )


def count_params(args: argparse.Namespace, layers: int) -> int:
    with torch.device("meta"):
        model = transformers.Qwen3ForCausalLM(qwen3_config(args, layers))
    return sum(p.numel() for p in model.parameters())


def pick_layers(args: argparse.Namespace) -> int:
    if args.size_gb is None:
        return args.layers or 4
    one, two = count_params(args, 1), count_params(args, 2)
    per_layer, fixed = two - one, 2 * one - two
    return max(1, round((args.size_gb * 1e9 / 2 - fixed) / per_layer))


def build_model(args: argparse.Namespace, layers: int) -> torch.nn.Module:
    """The model in bf16 on the device, the same weights for the same seed."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(args.device):
            model = transformers.Qwen3ForCausalLM(qwen3_config(args, layers))
    finally:
        torch.set_default_dtype(default)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.dim() >= 2:
                p.normal_(0.0, INIT_STD, generator=gen)
            else:
                p.fill_(1.0)
    return model


# ---------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------


def apollo_adamw() -> type[torch.optim.Optimizer]:
    """``apollo_torch.apollo.AdamW``, imported without ``apollo_torch/__init__.py``.

    That ``__init__`` imports the 8-bit variants, which import bitsandbytes (absent
    or noisy on many hosts, and not needed here). So a bare package module whose
    ``__path__`` is the installed package's directory stands in for it: the
    submodule and its relative imports (the projectors) load from the real files,
    and nothing else of the package runs.
    """
    name = "apollo_torch"
    if name not in sys.modules:
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("the apollo optimizers need `pip install apollo-torch`")
        package = types.ModuleType(name)
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules[name] = package
    from apollo_torch.apollo import AdamW  # type: ignore[import-not-found]

    return AdamW  # type: ignore[no-any-return]


def apollo_groups(model: torch.nn.Module, extra: dict[str, Any]) -> list[dict[str, Any]]:
    """APOLLO's split: the attention and MLP matrices low-rank, the rest AdamW."""
    low, rest = [], []
    for name, p in model.named_parameters():
        is_low = p.dim() == 2 and (".self_attn." in name or ".mlp." in name)
        (low if is_low else rest).append(p)
    return [{"params": rest}, {"params": low, **extra}]


def make_adamw(model: torch.nn.Module, lr: float, args: argparse.Namespace) -> Any:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)


def make_apollo(model: torch.nn.Module, lr: float, args: argparse.Namespace) -> Any:
    extra = {
        "rank": args.apollo_rank,
        "proj": "random",
        "scale_type": "channel",
        "scale": 1,
        "update_proj_gap": 200,
        "proj_type": "std",
    }
    return apollo_adamw()(apollo_groups(model, extra), lr=lr, weight_decay=0.0)


def make_apollo_mini(model: torch.nn.Module, lr: float, args: argparse.Namespace) -> Any:
    extra = {
        "rank": 1,
        "proj": "random",
        "scale_type": "tensor",
        "scale": 128,
        "update_proj_gap": 200,
        "proj_type": "std",
    }
    return apollo_adamw()(apollo_groups(model, extra), lr=lr, weight_decay=0.0)


OPTIMIZERS = {"adamw": make_adamw, "apollo": make_apollo, "apollo-mini": make_apollo_mini}


# ---------------------------------------------------------------------------
# The floor: one honest pass over every live byte and its file bytes
# ---------------------------------------------------------------------------


NO_BLOCKS = np.zeros(0, dtype=np.int64)


@dataclass
class FloorResult:
    seconds: float
    bytes: int
    elements: int
    elements_changed: int
    blocks: int
    blocks_changed: int


@dataclass
class _Buffers:
    #: The file's bytes, then the XOR of live and file (zero outside the chunk),
    #: both at the chunk's offset in its 4 KiB block.
    file: torch.Tensor
    xor: torch.Tensor
    #: Where a CUDA chunk is copied to (None on CPU).
    pinned: torch.Tensor | None


class Floor:
    """Counts the elements and 4 KiB blocks where live tensors differ from the files
    (see the module doc). One per model directory; ``close`` ends its threads."""

    def __init__(self, model_dir: Path, device: torch.device, threads: int) -> None:
        self.md = apollo_sync.ModelDir.open(model_dir)
        self.paths = [Path(h.path) for h in self.md.headers]
        self.sizes = [p.stat().st_size for p in self.paths]
        self.cuda = device.type == "cuda"
        self.threads = threads or os.cpu_count() or 1
        self.chunk = CHUNK[device.type]
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="floor")
        # one set of buffers per thread, allocated (and pinned) once, before timing
        self.buffers: queue.SimpleQueue[_Buffers] = queue.SimpleQueue()
        size = self.chunk + 2 * BLOCK
        for _ in range(self.threads):
            pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True) if self.cuda else None
            file_buf = torch.empty(size, dtype=torch.uint8)
            self.buffers.put(_Buffers(file_buf, torch.zeros(size, dtype=torch.uint8), pinned))

    def close(self) -> None:
        self.pool.shutdown()

    def _chunks(
        self, tensors: dict[str, torch.Tensor]
    ) -> Iterator[tuple[int, int, torch.Tensor, torch.dtype]]:
        """(shard, file offset, live bytes, element type) in file order."""
        disk = sorted(self.md.tensors.values(), key=lambda t: (t.shard, t.start))
        missing = set(self.md.tensors) - set(tensors)
        extra = set(tensors) - set(self.md.tensors)
        if missing or extra:
            raise SystemExit(f"live and file tensors differ: {sorted(missing | extra)[:5]}")
        for d in disk:
            t = tensors[d.name].detach()
            if not t.is_contiguous() or t.nbytes != d.end - d.start:
                raise SystemExit(f"{d.name}: live {t.dtype} {tuple(t.shape)} does not fit the file")
            view = WIDTH_VIEW[t.element_size()]
            flat = t.reshape(-1).view(torch.uint8)
            for lo in range(0, t.nbytes, self.chunk):
                yield d.shard, d.start + lo, flat[lo : lo + self.chunk], view

    def _compare(
        self,
        count: bool,
        fds: list[int],
        shard: int,
        offset: int,
        live: torch.Tensor,
        view: torch.dtype,
    ) -> tuple[int, int, np.ndarray]:
        bufs = self.buffers.get()
        try:
            return self._compare_into(bufs, count, fds, shard, offset, live, view)
        finally:
            self.buffers.put(bufs)

    def _compare_into(
        self,
        bufs: _Buffers,
        count: bool,
        fds: list[int],
        shard: int,
        offset: int,
        live: torch.Tensor,
        view: torch.dtype,
    ) -> tuple[int, int, np.ndarray]:
        file_buf, xor_buf, pinned = bufs.file, bufs.xor, bufs.pinned
        n = live.numel()
        pos = offset % BLOCK
        end = -(-(pos + n) // BLOCK) * BLOCK
        window = memoryview(file_buf.numpy())[pos : pos + n]
        done = 0
        while done < n:  # preadv releases the GIL
            got = os.preadv(fds[shard], [window[done:]], offset + done)
            if got <= 0:
                raise SystemExit(f"{self.paths[shard]}: short read at {offset + done}")
            done += got
        if pinned is not None:
            pinned[pos : pos + n].copy_(live)
            live = pinned[pos : pos + n]
        if not count:  # the floor itself: the XOR, in numpy (one thread, GIL released)
            np.bitwise_xor(live.numpy(), window, out=xor_buf.numpy()[pos : pos + n])
            return shard, 0, NO_BLOCKS
        xor_buf[:pos].zero_()
        xor_buf[pos + n : end].zero_()
        out = xor_buf[pos : pos + n].view(view)
        torch.bitwise_xor(live.view(view), file_buf[pos : pos + n].view(view), out=out)
        elements = int(torch.count_nonzero(out))
        changed = xor_buf[:end].view(torch.int64).view(-1, BLOCK // 8).ne(0).any(dim=1)
        blocks = torch.nonzero(changed).flatten().numpy() + offset // BLOCK
        return shard, elements, blocks

    def run(self, tensors: dict[str, torch.Tensor]) -> FloorResult:
        """The timed floor (live bytes to the host, file bytes read, XORed), then an
        untimed pass that counts what differs."""
        seconds = self._pass(tensors, count=False).seconds
        return replace(self._pass(tensors, count=True), seconds=seconds)

    def _pass(self, tensors: dict[str, torch.Tensor], count: bool) -> FloorResult:
        t0 = time.perf_counter()
        fds = [os.open(p, os.O_RDONLY) for p in self.paths]
        try:
            bitmaps = [np.zeros(-(-s // BLOCK), dtype=bool) for s in self.sizes]
            futures = [
                self.pool.submit(self._compare, count, fds, *chunk)
                for chunk in self._chunks(tensors)
            ]
            elements = total_bytes = total_elements = 0
            for f in futures:
                shard, changed, blocks = f.result()
                elements += changed
                bitmaps[shard][blocks] = True
        finally:
            for fd in fds:
                os.close(fd)
        seconds = time.perf_counter() - t0
        for t in tensors.values():
            total_bytes += t.nbytes
            total_elements += t.numel()
        return FloorResult(
            seconds=seconds,
            bytes=total_bytes,
            elements=total_elements,
            elements_changed=elements,
            blocks=sum(len(b) for b in bitmaps),
            blocks_changed=int(sum(b.sum() for b in bitmaps)),
        )


# ---------------------------------------------------------------------------
# Fingerprints, history
# ---------------------------------------------------------------------------


def fingerprint(model_dir: Path) -> dict[str, str]:
    """blake2b of each shard, the shards hashed in parallel (hashlib releases the GIL)."""
    paths = [Path(h.path) for h in apollo_sync.ModelDir.open(model_dir).headers]

    def digest(path: Path) -> str:
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(FINGERPRINT_READ):
                h.update(chunk)
        return h.hexdigest()

    with ThreadPoolExecutor(min(len(paths), os.cpu_count() or 1)) as pool:
        return dict(zip((p.name for p in paths), pool.map(digest, paths), strict=True))


def rollback_reach(model_dir: Path) -> tuple[int, int]:
    """(current generation, deepest generation a rollback can reach: every
    generation after it keeps its log)."""
    h = apollo_sync.history(model_dir)
    points = h.rollback_points()
    return h.generation, min(points, default=h.generation)


# ---------------------------------------------------------------------------
# One run: one optimizer, one learning rate
# ---------------------------------------------------------------------------


def sync_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"threads": args.threads}
    if args.undo_budget is not None:
        options["undo_budget"] = args.undo_budget
    if args.keep is not None:
        options["keep"] = args.keep
    return options


def train_step(model: Any, optimizer: Any, args: argparse.Namespace, gen: torch.Generator) -> float:
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen, device=args.device)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def one_step_saved(
    base: Path, size_gb: float, optimizer: str, lr: float, device: str = "cpu"
) -> tuple[dict[str, torch.Tensor], argparse.Namespace]:
    """This bench's model (``size_gb``), saved to ``base`` with its log made (an
    unchanged sync), then one step of ``optimizer`` at ``lr``: returns the live
    tensors after the step and the bench's arguments. For the probes that time
    one real step's sync over and over (``probes/dense_budget.py``,
    ``probes/writeback.py``)."""
    given = {"--size-gb": size_gb, "--steps": 1, "--lr": lr, "--device": device}
    args = parse_args([str(x) for kv in given.items() for x in kv])
    model = build_model(args, pick_layers(args))
    model.save_pretrained(base)
    apollo_sync.sync(base, model.state_dict())
    opt = OPTIMIZERS[optimizer](model, lr, args)
    train_step(model, opt, args, torch.Generator(device=device).manual_seed(args.seed + 1))
    return model.state_dict(), args


def fresh_copy(base: Path, work: Path) -> None:
    """``work`` as a copy of ``base``, written back and page-cached, as a model
    load leaves it."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(base, work)
    os.sync()
    for p in work.glob("*.safetensors"):
        p.read_bytes()


def run_one(
    args: argparse.Namespace, layers: int, name: str, lr: float, root: Path, first: dict[str, str]
) -> dict[str, Any]:
    model_dir = root / f"{name}-lr{lr:g}"
    shutil.rmtree(model_dir, ignore_errors=True)
    model = build_model(args, layers)
    shard = {} if args.shard_gb is None else {"max_shard_size": int(args.shard_gb * 1e9)}
    model.save_pretrained(model_dir, **shard)
    os.sync()
    prints = {0: fingerprint(model_dir)}
    if first and prints[0] != first:
        raise SystemExit(f"{model_dir}: the saved weights differ from the first run's")
    first.update(prints[0])
    model_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    optimizer = OPTIMIZERS[name](model, lr, args)
    device = torch.device(args.device)
    floor = Floor(model_dir, device, args.threads)
    gen = torch.Generator(device=args.device).manual_seed(args.seed + 1)
    options = sync_options(args)
    rows: list[dict[str, Any]] = []
    run: dict[str, Any] = {"optimizer": name, "lr": lr, "model_bytes": model_bytes, "rows": rows}
    try:
        for step in range(1, args.steps + 1):
            t0 = time.perf_counter()
            loss = train_step(model, optimizer, args, gen)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_s = time.perf_counter() - t0
            tensors = model.state_dict()
            fl = floor.run(tensors)
            t0 = time.perf_counter()
            dry = apollo_sync.sync(model_dir, tensors=tensors, dry_run=True, threads=args.threads)
            dry_wall = time.perf_counter() - t0
            disk0 = _disk_sectors_written(model_dir)
            t0 = time.perf_counter()
            res = apollo_sync.sync(model_dir, tensors=tensors, **options)
            sync_wall = time.perf_counter() - t0
            # the shards are flushed in the background after the sync returns: wait
            # for it here, to count what the disk received in all
            t0 = time.perf_counter()
            flush_errors = wait_flushes(Layout(model_dir))
            flush_s = time.perf_counter() - t0
            disk1 = _disk_sectors_written(model_dir)
            disk_total = None if disk0 is None or disk1 is None else (disk1 - disk0) * 512
            logged, log_field = res.log_bytes, "log_bytes"
            engine_elements = res.elements_changed
            engine_blocks = sum(f.blocks_changed for f in res.files)
            if res.generation is not None:
                prints[res.generation] = fingerprint(model_dir)
            row = {
                "step": step,
                "loss": loss,
                "train_s": train_s,
                "floor": asdict(fl),
                "dry_run_s": dry.seconds,
                "dry_run_wall_s": dry_wall,
                "dry_run_changed": dry.total_changed,
                "sync_s": res.seconds,
                "sync_wall_s": sync_wall,
                "total_compared": res.total_compared,
                "total_changed": res.total_changed,
                "bytes_written": res.bytes_written,
                "disk_bytes_written": res.disk_bytes_written,
                "flush_s": flush_s,
                "flush_errors": flush_errors,
                "disk_bytes_with_flush": disk_total,
                "log_bytes": logged,
                "log_field": log_field,
                "elements_changed_engine": engine_elements,
                "blocks_changed_engine": engine_blocks,
                "generation": res.generation,
                "warnings": list(res.warnings),
                # where the sync's time went (an older wheel's result has none)
                "stages": dict(getattr(res, "stages", {})),
            }
            rows.append(row)
            check_row(row)
        after = floor.run(model.state_dict())
        run["files_equal_live"] = after.elements_changed == 0
        if not run["files_equal_live"]:
            print(f"  ! after the last sync the floor still sees {after.elements_changed} changes")
        run["rollback"] = rollback_and_check(model_dir, prints)
        run["save_file"] = full_rewrite(model_dir, model.state_dict())
    finally:
        floor.close()
        del optimizer, model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if not args.keep_files:
            shutil.rmtree(model_dir, ignore_errors=True)
    return run


def check_row(row: dict[str, Any]) -> None:
    """Prints where the engine and the floor disagree."""
    fl = row["floor"]
    if row["blocks_changed_engine"] != fl["blocks_changed"]:
        print(
            f"  ! step {row['step']}: engine blocks {row['blocks_changed_engine']} "
            f"!= floor blocks {fl['blocks_changed']}"
        )
    if row["dry_run_changed"] != row["total_changed"]:
        print(f"  ! step {row['step']}: dry run {row['dry_run_changed']} != sync changed")
    engine = row["elements_changed_engine"]
    if engine is not None and engine != fl["elements_changed"]:
        print(f"  ! step {row['step']}: engine elements {engine} != floor {fl['elements_changed']}")
    for w in row["warnings"]:
        print(f"  (sync warning: {w})")


def rollback_and_check(model_dir: Path, prints: dict[int, dict[str, str]]) -> dict[str, Any]:
    current, deepest = rollback_reach(model_dir)
    out: dict[str, Any] = {"current": current, "to": deepest, "depth": current - deepest}
    if deepest == current:
        return out
    t0 = time.perf_counter()
    apollo_sync.rollback(model_dir, to=deepest)
    out["seconds"] = time.perf_counter() - t0
    want = prints.get(deepest)
    out["verified"] = None if want is None else fingerprint(model_dir) == want
    return out


def full_rewrite(model_dir: Path, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    path = model_dir / "_rewrite.safetensors.tmp"
    try:
        t0 = time.perf_counter()
        safetensors.torch.save_file(tensors, path)
        save_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_s = time.perf_counter() - t0
        return {"seconds": save_s, "fsync_seconds": fsync_s, "bytes": path.stat().st_size}
    finally:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def _over(disk: int | None, changed: int, logged: int | None) -> str:
    """Disk bytes beyond the log, per changed byte (1.00: exactly the changed blocks)."""
    if disk is None or not changed:
        return "n/a"
    return f"{(disk - (logged or 0)) / changed:.2f}"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def print_run(run: dict[str, Any], device: str) -> None:
    limit = RATIO_LIMIT["cuda" if device.startswith("cuda") else "cpu"]
    rows = run["rows"]
    field = rows[0]["log_field"] if rows else "log_bytes"
    size = run["model_bytes"]
    print(f"\n### {run['optimizer']}, lr {run['lr']:g} (model {fmt_bytes(size)})\n")
    print(
        "| step | elements changed | blocks changed | floor s | dry-run s | sync s "
        f"| sync/floor | log ({field}) | disk in sync | flush s | disk with flush "
        "| / changed | sync GB/s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        fl = r["floor"]
        ratio = r["sync_s"] / fl["seconds"]
        mark = " !" if ratio > limit else ""
        logged = r["log_bytes"]
        log_text = "n/a" if logged is None else f"{fmt_bytes(logged)} ({100 * logged / size:.1f}%)"
        print(
            f"| {r['step']} | {100 * fl['elements_changed'] / fl['elements']:.2f}% "
            f"| {100 * fl['blocks_changed'] / fl['blocks']:.2f}% "
            f"| {fl['seconds']:.3f} | {r['dry_run_s']:.3f} | {r['sync_s']:.3f} "
            f"| {ratio:.2f}{mark} | {log_text} | {fmt_bytes(r['disk_bytes_written'])} "
            f"| {r['flush_s']:.3f} | {fmt_bytes(r['disk_bytes_with_flush'])} "
            f"| {_over(r['disk_bytes_with_flush'], r['total_changed'], r['log_bytes'])} "
            f"| {r['total_compared'] / r['sync_s'] / 1e9:.2f} |"
        )
    rb = run["rollback"]
    print()
    if rb["depth"] == 0:
        print(f"rollback: depth 0 (generation {rb['current']}: no earlier one reachable)")
    else:
        verified = {True: "files match", False: "FILES DIFFER", None: "no fingerprint"}
        print(
            f"rollback: depth {rb['depth']} (generation {rb['current']} -> {rb['to']}) "
            f"in {rb['seconds']:.3f} s, {verified[rb['verified']]}"
        )
    sf = run["save_file"]
    print(
        f"save_file (full rewrite): {sf['seconds']:.3f} s + fsync {sf['fsync_seconds']:.3f} s "
        f"for {fmt_bytes(sf['bytes'])}"
    )
    if not run["files_equal_live"]:
        print("after the last sync the files DIFFER from the live weights")


def machine(device: str) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "apollo_sync": apollo_sync.__version__,
        "python": platform.python_version(),
    }
    if device.startswith("cuda"):
        facts["device_name"] = torch.cuda.get_device_name(torch.device(device))
    return facts


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    transformers.utils.logging.disable_progress_bar()  # save_pretrained's shard bar
    layers = pick_layers(args)
    params = count_params(args, layers)
    print(
        f"Qwen3 hidden {args.hidden}, {layers} layers, intermediate {args.intermediate}, "
        f"vocab {args.vocab}: {params / 1e6:.0f} M params, {fmt_bytes(2 * params)} bf16; "
        f"{args.device}, batch {args.batch} x {args.seq}, {args.steps} steps"
    )
    root = args.dir or Path(tempfile.mkdtemp(prefix="apollo-train-"))
    root.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    first: dict[str, str] = {}
    try:
        for name in args.optimizers:
            for lr in args.lr:
                run = run_one(args, layers, name, lr, root, first)
                runs.append(run)
                print_run(run, args.device)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"\npeak RSS {fmt_bytes(peak)}")
    if args.json:
        report = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "layers": layers,
            "params": params,
            "machine": machine(args.device),
            "peak_rss_bytes": peak,
            "runs": runs,
        }
        args.json.write_text(json.dumps(report, indent=1, default=float))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
