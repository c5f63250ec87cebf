"""``apollo-sync demo``: the main job, end to end, on a generated model.

The model is a small ``LlamaForCausalLM`` checkpoint (sharded safetensors, index,
``config.json``) that ``transformers`` loads. A producer process loads its files,
holds the weights in vLLM's merged layout (``qkv_proj``, ``gate_up_proj``,
``language_model.`` prefixes) in shared memory, exports handles, and then trains:
a transformers model built on :func:`apollo_sync.hf_views` of those tensors, so
that each optimizer step (AdamW by default, in place in bf16) changes the memory
it exported. This process syncs after each step through the handles, counts the
elements and blocks that changed, checks the files against the live weights with
``safetensors``, prints a table, and rolls back several generations and forward
again. No GPU is needed. ``--mode sparse`` (the producer's default, which tests
use) replaces training by sparse updates to a fraction of the blocks.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from safetensors.torch import load_file, save_file

from apollo_sync import journal as gens
from apollo_sync.errors import LayoutError
from apollo_sync.handles import export_handles, load_handles
from apollo_sync.hf_views import hf_views
from apollo_sync.model_dir import ModelDir
from apollo_sync.steps import StepCounter
from apollo_sync.sync import SyncResult, sync
from apollo_sync.verify import changed_elements, mismatches

BLOCK = 4096
MODES = ("train", "sparse")
OPTIMIZERS = ("adamw", "sgd")


#: (hidden size, attention heads, key/value heads) of the shapes the demo model
#: may take, largest first; the head size is 128, and the intermediate size and
#: the vocabulary grow with the hidden size as in Llama/Qwen models.
SHAPES = ((1024, 8, 2), (768, 6, 2), (512, 4, 1), (256, 2, 1))


def demo_config(size_mb: int) -> dict[str, int]:
    """A small Llama/Qwen-shaped config whose bf16 weights weigh about ``size_mb``:
    the widest shape of :data:`SHAPES` that fits two layers in ``size_mb``, with as
    many layers as fit (at least one)."""
    for hidden, heads, kv_heads in SHAPES:
        head_dim = 128
        inter = hidden * 11 // 4
        vocab = hidden * 16
        per_layer = (
            hidden * heads * head_dim * 2
            + hidden * kv_heads * head_dim * 2
            + 3 * hidden * inter
            + 2 * hidden
        ) * 2
        fixed = (2 * vocab * hidden + hidden) * 2
        if fixed + 2 * per_layer <= size_mb * 1e6:
            break
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


def hf_config(cfg: dict[str, int], dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """The ``config.json`` of a ``LlamaForCausalLM`` with the dimensions ``cfg``
    (what ``AutoModelForCausalLM.from_pretrained`` needs to load the demo model)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **cfg,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "dtype": str(dtype).removeprefix("torch."),
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
    (root / "config.json").write_text(json.dumps(hf_config(cfg, dtype), indent=1))
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


class Trainer:
    """Real training on the live weights: a transformers model built on
    :func:`apollo_sync.hf_views` of ``live``, so that its parameters are views into
    the tensors the producer exported, and a torch optimizer that steps them in
    place, in their own dtype, on batches of random tokens. Each optimizer step
    writes into the memory a consumer syncs from."""

    def __init__(
        self,
        live: dict[str, torch.Tensor],
        model_dir: Path,
        *,
        optimizer: str = "adamw",
        lr: float = 1e-5,
        seed: int = 1,
        batch: int = 2,
        seq_len: int = 32,
    ) -> None:
        try:
            from transformers import AutoConfig, AutoModelForCausalLM
        except ImportError as e:
            raise ImportError(
                "the demo's training needs transformers (pip install 'transformers>=5'); "
                "--mode sparse runs without it"
            ) from e
        first = next(iter(live.values()))
        config: Any = AutoConfig.from_pretrained(model_dir)
        torch.manual_seed(seed)  # the initial weights are replaced by the views below
        # transformers leaves from_config unannotated
        model: Any = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            config, dtype=first.dtype
        ).to(first.device)
        views = hf_views(live, model_dir)
        missing, unexpected = model.load_state_dict(views, strict=False, assign=True)
        if missing or unexpected:
            raise LayoutError(
                f"{model_dir}: the views do not cover the model: missing {missing}, "
                f"unexpected {unexpected}"
            )
        storages = {t.untyped_storage().data_ptr() for t in live.values()}
        copies = [
            n for n, p in model.named_parameters() if p.untyped_storage().data_ptr() not in storages
        ]
        if copies:
            raise LayoutError(f"parameters that are not views into the live tensors: {copies}")
        model.train()
        params = list(model.parameters())
        if optimizer == "adamw":
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=lr)
        elif optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=lr)
        else:
            raise ValueError(f"unknown optimizer {optimizer!r} (adamw, sgd)")
        self.model = model
        self.vocab = int(config.vocab_size)
        self.shape = (batch, seq_len)
        self.device = first.device
        self.gen = torch.Generator().manual_seed(seed)

    def step(self, counter: StepCounter | None = None) -> float:
        """One forward, backward and optimizer step; returns the loss. The step
        counter marks only the optimizer step: nothing else writes the weights."""
        ids = torch.randint(self.vocab, self.shape, generator=self.gen).to(self.device)
        loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        with counter.step() if counter is not None else contextlib.nullcontext():
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def producer_main(argv: list[str] | None = None) -> int:
    """Holds live weights in shared memory and steps them on request (stdin)."""
    ap = argparse.ArgumentParser(prog="apollo_sync.demo producer")
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--handles", type=Path, required=True)
    ap.add_argument(
        "--mode",
        choices=MODES,
        default="sparse",
        help="train: optimizer steps of a transformers model on the live weights; "
        "sparse: add 0.25 to one element in --fraction of the 4 KiB blocks",
    )
    ap.add_argument("--fraction", type=float, default=0.005)
    ap.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--batch", type=int, default=2, help="sequences per training step")
    ap.add_argument("--seq-len", type=int, default=32, help="tokens per sequence")
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
    # built after the export, on the exported tensors: the parameters are that memory
    trainer = (
        Trainer(
            live,
            args.model_dir,
            optimizer=args.optimizer,
            lr=args.lr,
            seed=args.seed,
            batch=args.batch,
            seq_len=args.seq_len,
        )
        if args.mode == "train"
        else None
    )
    gen = torch.Generator().manual_seed(args.seed)
    print(json.dumps({"ready": len(live)}), flush=True)
    try:
        for line in sys.stdin:
            cmd = line.split()
            if not cmd or cmd[0] == "quit":
                break
            if cmd[0] == "step" and trainer is not None:
                print(json.dumps({"loss": trainer.step(counter)}), flush=True)
            elif cmd[0] == "step":
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
    """A producer subprocess (see :func:`producer_main`): ``mode="sparse"`` (the
    default) applies sparse updates, ``mode="train"`` real optimizer steps."""

    def __init__(
        self,
        model_dir: Path,
        handles: Path,
        *,
        fraction: float = 0.005,
        seed: int = 1,
        device: str = "cpu",
        step_counter: bool = False,
        mode: str = "sparse",
        optimizer: str = "adamw",
        lr: float = 1e-5,
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
                "--mode",
                mode,
                "--fraction",
                str(fraction),
                "--optimizer",
                optimizer,
                "--lr",
                str(lr),
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
        #: The producer's reply to the last step: ``{"blocks": n}`` for a sparse
        #: step, ``{"loss": x}`` for a training step.
        try:
            self.reply: dict[str, Any] = self._read()
        except BaseException:
            self.close()
            raise

    def _read(self) -> dict[str, Any]:
        out: IO[str] | None = self.proc.stdout
        line = out.readline() if out else ""
        if not line:
            raise RuntimeError(f"demo producer exited (code {self.proc.wait()})")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def step(self, fraction: float | None = None) -> int:
        """Steps the weights; returns how many blocks a sparse step touched (0 for
        a training step: see :attr:`reply`)."""
        assert self.proc.stdin
        self.proc.stdin.write("step" + (f" {fraction}" if fraction is not None else "") + "\n")
        self.proc.stdin.flush()
        self.reply = self._read()
        return int(self.reply.get("blocks", 0))

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
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None and not pipe.closed:
                with contextlib.suppress(BrokenPipeError):
                    pipe.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Row:
    """One sync of the demo, as its table shows it."""

    label: str
    loss: float | None
    elements: tuple[int, int]  # changed, compared
    blocks: tuple[int, int]  # changed, holding tensor data
    result: SyncResult
    ok: bool


def run_demo(
    *,
    size_mb: int = 64,
    steps: int = 5,
    fraction: float = 0.005,
    workdir: Path | None = None,
    block_size: int = BLOCK,
    mode: str = "train",
    optimizer: str = "adamw",
    lr: float = 1e-5,
) -> int:
    """Generates a model, starts a producer, syncs after each step, verifies,
    summarizes, rolls back to the first step's generation and forward again."""
    if mode == "train" and importlib.util.find_spec("transformers") is None:
        raise ImportError(
            "the demo's training needs transformers (pip install 'transformers>=5'); "
            "--mode sparse runs without it"
        )
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="apollo-sync-demo-")
        workdir = Path(tmp.name)
    try:
        model = workdir / "model"
        cfg = demo_config(size_mb)
        print(f"generating a {size_mb} MB bf16 model in {model} ...", file=sys.stderr)
        make_demo_model(model, size_mb)
        os.sync()  # so the disk column counts the syncs, not the model's first writeback
        model_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        handles = workdir / "handles" / "weight_handles.pt"
        rows: list[Row] = []
        digests: dict[int, str] = {}  # generation -> sha256 of the shards
        if mode == "train":
            what = f"{optimizer} (lr {lr:g}) steps of LlamaForCausalLM on random tokens"
        else:
            what = f"sparse updates to {fraction:.2%} of the 4 KiB blocks"
        print(
            f"{cfg['num_hidden_layers']}-layer Llama, hidden {cfg['hidden_size']}, "
            f"{model_bytes / 1e6:.0f} MB bf16; the producer applies {what}, in place in "
            "the shared memory this process syncs from"
        )
        with Producer(
            model, handles, fraction=fraction, mode=mode, optimizer=optimizer, lr=lr
        ) as prod:
            for step in range(steps + 1):
                loss = None
                if step:
                    prod.step()
                    loss = prod.reply.get("loss")
                label = f"step {step}" if step else "initial"
                with load_handles(handles) as h:
                    md = ModelDir.open(model)
                    # the files still hold the previous generation: count what differs,
                    # independently of the engine, to check the count its log keeps
                    elements = changed_elements(md, h.tensors)
                    result = sync(handles=h, block_size=block_size, progress=sys.stderr.isatty())
                    ok = not mismatches(ModelDir.open(model), h.tensors)
                if result.elements_changed != elements[0]:
                    print(
                        f"{label}: the log counted {result.elements_changed:,} changed "
                        f"elements, the files differed in {elements[0]:,}",
                        file=sys.stderr,
                    )
                    ok = False
                blocks = (
                    sum(f.blocks_changed for f in result.files),
                    _data_blocks(md, block_size),
                )
                rows.append(Row(label, loss, elements, blocks, result, ok))
                if result.generation is not None:
                    digests[result.generation] = _shards_digest(model)
                print(
                    f"{label}: {_pct(*elements)} of the elements and {_pct(*blocks)} of the "
                    f"blocks changed, verified={'yes' if ok else 'NO'}",
                    file=sys.stderr,
                )
        _summary(rows, block_size)
        if mode == "train" and len(rows) > 1:
            print(
                "(the blocks that stay are mostly the embedding's: only the rows of tokens "
                "in a step's batch get a gradient)"
            )
        rolled = _rollback_check(model, digests)
        return 0 if rolled and all(r.ok for r in rows) else 1
    finally:
        if tmp is not None:
            tmp.cleanup()


def _data_blocks(md: ModelDir, block_size: int) -> int:
    """How many ``block_size`` blocks of the shards hold tensor data."""
    return sum(-(-h.file_len // block_size) - h.data_start // block_size for h in md.headers)


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "-"


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


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.1f} MB"


def _summary(rows: list[Row], block_size: int) -> None:
    blocks = f"{block_size // 1024} KiB" if block_size % 1024 == 0 else f"{block_size} B"
    head = (
        "sync",
        "loss",
        "elements changed",
        f"{blocks} blocks changed",
        "written",
        "log",
        "disk writes",
        "time",
        "generation",
        "files == live",
    )
    table = [head]
    for row in rows:
        r = row.result
        table.append(
            (
                row.label,
                "-" if row.loss is None else f"{row.loss:.3f}",
                f"{row.elements[0]:,} ({_pct(*row.elements)})",
                _pct(*row.blocks),
                _mb(r.bytes_written),
                _mb(r.log_bytes),
                _mb(r.disk_bytes_written),
                f"{r.seconds:.2f} s",
                "-" if r.generation is None else str(r.generation),
                "yes" if row.ok else "NO",
            )
        )
    widths = [max(len(row[c]) for row in table) for c in range(len(head))]
    for n, line in enumerate(table):
        print(
            "  ".join(
                cell.rjust(w) if c else cell.ljust(w)
                for c, (cell, w) in enumerate(zip(line, widths, strict=True))
            )
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))
    stepped = rows[1:]
    if stepped:
        el = sorted(100 * r.elements[0] / max(1, r.elements[1]) for r in stepped)
        bl = sorted(100 * r.blocks[0] / max(1, r.blocks[1]) for r in stepped)
        print(
            f"\neach step changed {el[0]:.2f}-{el[-1]:.2f}% of the elements, "
            f"but {bl[0]:.1f}-{bl[-1]:.1f}% of the {blocks} blocks"
        )


if __name__ == "__main__":
    raise SystemExit(producer_main())
