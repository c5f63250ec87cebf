"""``apollo-sync demo``: the main job, end to end, on a generated model.

A producer process generates nothing itself: it loads the model files, holds the
weights in vLLM's merged layout (``qkv_proj``, ``gate_up_proj``, ``language_model.``
prefixes) in shared memory, exports handles, and applies sparse training-like
updates when told to. This process syncs after each update through the handles,
checks the files against the live weights with ``safetensors``, and prints a
summary. No GPU is needed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

import torch
from safetensors.torch import load_file, save_file

from apollo_sync import journal as gens
from apollo_sync.handles import export_handles, load_handles
from apollo_sync.model_dir import ModelDir
from apollo_sync.steps import StepCounter
from apollo_sync.sync import SyncResult, sync
from apollo_sync.verify import mismatches

BLOCK = 4096


def demo_config(size_mb: int) -> dict[str, int]:
    """A small Llama/Qwen-shaped config whose bf16 weights weigh about ``size_mb``."""
    hidden, inter, vocab = 1024, 2816, 16384
    heads, kv_heads, head_dim = 8, 2, 128
    per_layer = (
        hidden * heads * head_dim * 2
        + hidden * kv_heads * head_dim * 2
        + 3 * hidden * inter
        + 2 * hidden
    ) * 2
    fixed = (2 * vocab * hidden + hidden) * 2
    layers = max(1, round((size_mb * 1e6 - fixed) / per_layer))
    return {
        "hidden_size": hidden,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "num_hidden_layers": layers,
    }


def make_demo_model(
    root: Path,
    size_mb: int = 256,
    *,
    shards: int = 3,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Writes an HF-named, sharded safetensors checkpoint (with index and config) to ``root``."""
    cfg = demo_config(size_mb)
    g = torch.Generator().manual_seed(seed)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = (
        cfg["num_attention_heads"] * cfg["head_dim"],
        cfg["num_key_value_heads"] * cfg["head_dim"],
    )

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(dtype)

    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": w(v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        tensors |= {
            p + "input_layernorm.weight": torch.ones(h, dtype=dtype),
            p + "self_attn.q_proj.weight": w(q, h),
            p + "self_attn.k_proj.weight": w(kv, h),
            p + "self_attn.v_proj.weight": w(kv, h),
            p + "self_attn.o_proj.weight": w(h, q),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=dtype),
            p + "mlp.gate_proj.weight": w(i, h),
            p + "mlp.up_proj.weight": w(i, h),
            p + "mlp.down_proj.weight": w(h, i),
        }
    tensors["model.norm.weight"] = torch.ones(h, dtype=dtype)
    tensors["lm_head.weight"] = w(v, h)
    root.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    per = math.ceil(len(names) / shards)
    weight_map: dict[str, str] = {}
    for s in range(shards):
        part = names[s * per : (s + 1) * per]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(root / fname), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, fname)
    total = sum(t.nbytes for t in tensors.values())
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    (root / "config.json").write_text(json.dumps({"model_type": "llama", **cfg}, indent=1))
    return root


def to_vllm_layout(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF tensors merged the way vLLM holds them (qkv_proj, gate_up_proj, prefixes)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in hf.items():
        if ".k_proj." in name or ".v_proj." in name or ".up_proj." in name:
            continue
        if ".q_proj." in name:
            parts = [hf[name.replace(".q_proj.", x)] for x in (".q_proj.", ".k_proj.", ".v_proj.")]
            t, name = torch.cat(parts), name.replace(".q_proj.", ".qkv_proj.")
        elif ".gate_proj." in name:
            t = torch.cat([t, hf[name.replace(".gate_proj.", ".up_proj.")]])
            name = name.replace(".gate_proj.", ".gate_up_proj.")
        out["language_model." + name] = t.contiguous()
    return out


def load_live(model_dir: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, merged as vLLM holds them, on ``device``."""
    hf: dict[str, torch.Tensor] = {}
    for h in ModelDir.open(model_dir).headers:
        hf |= load_file(h.path)
    return {k: v.to(device) for k, v in to_vllm_layout(hf).items()}


def training_step(live: dict[str, torch.Tensor], fraction: float, gen: torch.Generator) -> int:
    """Changes about ``fraction`` of the 4 KiB blocks of ``live``, in place; returns
    how many blocks it touched."""
    sizes = torch.tensor([t.nbytes for t in live.values()], dtype=torch.float64)
    blocks = max(1, int(sizes.sum().item() / BLOCK * fraction))
    names = list(live)
    picks = torch.multinomial(sizes, blocks, replacement=True, generator=gen)
    for k in picks.tolist():
        flat = live[names[k]].view(-1)
        per_block = max(1, BLOCK // flat.element_size())
        nblocks = max(1, flat.numel() // per_block)
        b = int(torch.randint(nblocks, (1,), generator=gen))
        at = b * per_block + int(torch.randint(min(per_block, flat.numel()), (1,), generator=gen))
        at = min(at, flat.numel() - 1)
        flat[at] = flat[at] + 0.25
    return blocks


def producer_main(argv: list[str] | None = None) -> int:
    """Holds live weights in shared memory and steps them on request (stdin)."""
    ap = argparse.ArgumentParser(prog="apollo_sync.demo producer")
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--handles", type=Path, required=True)
    ap.add_argument("--fraction", type=float, default=0.005)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="where the live weights live (cpu, cuda)")
    ap.add_argument(
        "--step-counter", action="store_true", help="mark each step on an exported step counter"
    )
    args = ap.parse_args(argv)
    live = load_live(args.model_dir, args.device)
    counter = StepCounter.create() if args.step_counter else None
    export_handles(
        live, args.handles, metadata={"model_path": str(args.model_dir)}, step_counter=counter
    )
    gen = torch.Generator().manual_seed(args.seed)
    print(json.dumps({"ready": len(live)}), flush=True)
    try:
        for line in sys.stdin:
            cmd = line.split()
            if not cmd or cmd[0] == "quit":
                break
            if cmd[0] == "step":
                fraction = float(cmd[1]) if len(cmd) > 1 else args.fraction
                with counter.step() if counter is not None else contextlib.nullcontext():
                    blocks = training_step(live, fraction, gen)
                print(json.dumps({"blocks": blocks}), flush=True)
    finally:
        if counter is not None:
            counter.unlink()
            counter.close()
    return 0


class Producer:
    """A producer subprocess (see :func:`producer_main`)."""

    def __init__(
        self,
        model_dir: Path,
        handles: Path,
        *,
        fraction: float = 0.005,
        seed: int = 1,
        device: str = "cpu",
        step_counter: bool = False,
    ) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "apollo_sync.demo",
                "--model-dir",
                str(model_dir),
                "--handles",
                str(handles),
                "--fraction",
                str(fraction),
                "--seed",
                str(seed),
                "--device",
                device,
                *(["--step-counter"] if step_counter else []),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.handles = handles
        self._read()

    def _read(self) -> dict[str, Any]:
        out: IO[str] | None = self.proc.stdout
        line = out.readline() if out else ""
        if not line:
            raise RuntimeError(f"demo producer exited (code {self.proc.wait()})")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def step(self, fraction: float | None = None) -> int:
        assert self.proc.stdin
        self.proc.stdin.write("step" + (f" {fraction}" if fraction is not None else "") + "\n")
        self.proc.stdin.flush()
        return int(self._read()["blocks"])

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_demo(
    *,
    size_mb: int = 256,
    steps: int = 3,
    fraction: float = 0.005,
    workdir: Path | None = None,
    block_size: int = BLOCK,
) -> int:
    """Generates a model, starts a producer, syncs after each update, verifies, summarizes."""
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="apollo-sync-demo-")
        workdir = Path(tmp.name)
    try:
        model = workdir / "model"
        print(f"generating a {size_mb} MB bf16 model in {model} ...", file=sys.stderr)
        make_demo_model(model, size_mb)
        os.sync()  # so the disk column counts the syncs, not the model's first writeback
        handles = workdir / "handles" / "weight_handles.pt"
        rows: list[tuple[str, int, SyncResult, bool]] = []
        digests: dict[int, str] = {}  # generation -> sha256 of the shards
        with Producer(model, handles, fraction=fraction) as prod:
            for step in range(steps + 1):
                touched = prod.step() if step else 0
                label = f"step {step}" if step else "initial"
                with load_handles(handles) as h:
                    result = sync(handles=h, block_size=block_size, progress=sys.stderr.isatty())
                    ok = not mismatches(ModelDir.open(model), h.tensors)
                rows.append((label, touched, result, ok))
                if result.generation is not None:
                    digests[result.generation] = _shards_digest(model)
                print(
                    f"{label}: {result.total_changed / 1e6:.2f} MB changed, "
                    f"verified={'yes' if ok else 'NO'}",
                    file=sys.stderr,
                )
        _summary(rows)
        rolled = _rollback_check(model, digests)
        return 0 if rolled and all(ok for *_, ok in rows) else 1
    finally:
        if tmp is not None:
            tmp.cleanup()


def _shards_digest(model: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(model.glob("*.safetensors")):
        with open(p, "rb") as f:
            while chunk := f.read(16 << 20):
                h.update(chunk)
    return h.hexdigest()


def _rollback_check(model: Path, digests: dict[int, str]) -> bool:
    """Rolls the directory back to the first step's generation and forward again,
    checking the files each time against what that sync left."""
    if len(digests) < 2:
        return True
    first, last = min(digests), max(digests)
    back = gens.rollback(model, first)
    ok_back = _shards_digest(model) == digests[first]
    gens.rollback(model, last)  # a rollback is a generation: undo it too
    ok_forward = _shards_digest(model) == digests[last]
    from apollo_sync.cli import render_history

    print(
        f"\nrollback to generation {first} (as generation {back.number}): files equal what "
        f"that sync wrote: {'yes' if ok_back else 'NO'}; and forward to {last} again: "
        f"{'yes' if ok_forward else 'NO'}\n\napollo-sync history:\n"
        + render_history(gens.history(model))
    )
    return ok_back and ok_forward


def _summary(rows: list[tuple[str, int, SyncResult, bool]]) -> None:
    head = (
        "sync",
        "blocks hit",
        "compared",
        "changed",
        "written",
        "disk writes",
        "time",
        "GB/s",
        "generation",
        "files == live",
    )
    table = [head]
    for label, touched, r, ok in rows:
        table.append(
            (
                label,
                str(touched),
                f"{r.total_compared / 1e6:.1f} MB",
                f"{r.total_changed / 1e6:.3f} MB",
                f"{r.bytes_written / 1e6:.3f} MB",
                "n/a" if r.disk_bytes_written is None else f"{r.disk_bytes_written / 1e6:.3f} MB",
                f"{r.seconds:.3f} s",
                f"{r.gb_per_s:.2f}",
                "-" if r.generation is None else str(r.generation),
                "yes" if ok else "NO",
            )
        )
    widths = [max(len(row[c]) for row in table) for c in range(len(head))]
    for n, row in enumerate(table):
        print(
            "  ".join(
                cell.rjust(w) if c else cell.ljust(w)
                for c, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    raise SystemExit(producer_main())
