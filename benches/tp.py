"""Tensor-parallel benchmark: one producer process per GPU, one consumer syncing them.

For each tensor-parallel size asked (``--tp 1,2,4``), on a Qwen3-shaped checkpoint
(``--layers`` decoder layers of hidden 4096, 32 query / 8 KV heads of 128,
intermediate 12288, vocabulary 151936; HF-named, in shards of about 2 GB):

* starts ``tp`` producer processes, one per GPU: each builds its rank's tensors
  with the sharding helper of the tests (``tests/vllm_sharding.py``, vLLM's loader
  rules), holds them in its GPU's memory and exports CUDA IPC handles through the
  worker extension, as ``collective_rpc("apollo_export_handles")`` does in vLLM;
* this process is the consumer: it syncs from rank 0's handles path (tp 1: the
  single-GPU path, for comparison) once with nothing changed, then ``--steps``
  times: every producer flips the lowest bit of the elements whose bits are the
  step number modulo ``--modulus`` (an element-wise rule, so K/V replicas stay equal, as a
  training step keeps them; at 1/50 every block changes), or with ``--density D``
  that share of elements at positions drawn from a seed every rank shares (2.4e-6
  changes about 0.5% of the 4 KiB blocks, the scattered pattern), and the consumer
  syncs, timed;
* checks the files against the live tensors (``verify.mismatches``: the ranks read
  through another path than the sync's staging) and prints a table: seconds, GB
  compared per second, bytes changed, log bytes, per tensor-parallel size, next to
  the device-to-host bandwidth of that many GPUs copying at once into pinned memory
  (measured here, after the syncs) and the sync's share of it.

Usage: ``python3 benches/tp.py [--tp 1,2,4] [--layers 8] [--steps 2] [--modulus 50]
[--density D] [--no-journal] [--out DIR]``. Needs as many CUDA devices as the largest size.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from safetensors.torch import load_file, save_file  # noqa: E402

from apollo_sync import ModelDir, sync  # noqa: E402
from apollo_sync.ranks import open_handles  # noqa: E402
from apollo_sync.verify import mismatches  # noqa: E402
from vllm_sharding import Shape, shard  # noqa: E402

HIDDEN, HEADS, KV, HEAD_DIM, INTER, VOCAB = 4096, 32, 8, 128, 12288, 151936
SHAPE = Shape(heads=HEADS, kv_heads=KV, head_dim=HEAD_DIM, vocab=VOCAB)


def make_checkpoint(root: Path, layers: int) -> None:
    """A random bf16 Qwen3-shaped checkpoint, HF-named, in shards of about 2 GB."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    names: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        names |= {
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": (KV * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": (KV * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
            p + "self_attn.q_norm.weight": (HEAD_DIM,),
            p + "self_attn.k_norm.weight": (HEAD_DIM,),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN),
            p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
        }
    names |= {"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}
    root.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in names.items():
        t = rnd(*shape)
        if size and size + t.nbytes > 2 << 30:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    weight_map = {}
    for i, part in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, str(root / fname), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, fname)
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))


def flip(t: torch.Tensor, modulus: int, step: int) -> None:
    """Element-wise: the lowest bit of every element whose bits are ``step`` mod ``modulus``.

    The residue moves with the step: a flipped element leaves its residue, so a fixed
    one would find nothing left to change at the next step.
    """
    bits = t.view(torch.int16)
    bits ^= (bits.remainder(modulus) == step % modulus).to(torch.int16)


def scatter(t: torch.Tensor, density: float, step: int, salt: int) -> None:
    """The lowest bit of a ``density`` share of the elements, at positions drawn from a
    seed of (step, parameter): every rank draws the same local positions, so K/V
    replicas stay equal."""
    g = torch.Generator(device=t.device).manual_seed(step * 1_000_003 + salt)
    mask = torch.rand(t.numel(), generator=g, device=t.device) < density
    t.view(torch.int16).view(-1).bitwise_xor_(mask.to(torch.int16))


def producer(
    root: str, tp: int, index: int, handles: str, modulus: int, density: float, conn: Any
) -> None:
    try:
        from types import SimpleNamespace

        from apollo_sync.vllm_ext import ApolloSyncWorkerExtension

        torch.cuda.set_device(index)
        hf: dict[str, torch.Tensor] = {}
        for f in sorted(Path(root).glob("*.safetensors")):
            hf |= load_file(f)
        layers = 1 + max(int(n.split(".")[2]) for n in hf if n.startswith("model.layers."))
        rank = shard(hf, SHAPE, tp, layers=layers)[index]
        del hf
        for p in rank.model.parameters():
            p.data = p.data.to(f"cuda:{index}")

        class Worker(ApolloSyncWorkerExtension):
            pass

        w = Worker()
        w.rank = index
        w.model_runner = SimpleNamespace(model=rank.model)
        w.vllm_config = SimpleNamespace(
            model_config=SimpleNamespace(
                model=root,
                revision=None,
                hf_config=SimpleNamespace(architectures=["Qwen3ForCausalLM"]),
                dtype=torch.bfloat16,
                quantization=None,
            ),
            parallel_config=SimpleNamespace(
                tensor_parallel_size=tp, pipeline_parallel_size=1, enable_expert_parallel=False
            ),
            lora_config=None,
            instance_id=f"bench-tp{tp}",
        )
        w.apollo_export_handles(handles)
        torch.cuda.synchronize()
        conn.send("ready")
        while (msg := conn.recv()) != "exit":
            with torch.no_grad():
                for salt, p in enumerate(rank.model.parameters()):
                    if density:
                        scatter(p.data, density, msg, salt)
                    else:
                        flip(p.data, modulus, msg)
            torch.cuda.synchronize()
            conn.send("stepped")
    except BaseException as e:
        conn.send(f"error: {type(e).__name__}: {e}")
        raise


def d2h(devices: int, gb: float = 2.0) -> float:
    """GB/s of device-to-host copies into pinned memory, all ``devices`` GPUs at once."""
    import threading

    n = int(gb * 1e9) // 2
    src = [torch.ones(n, dtype=torch.bfloat16, device=f"cuda:{i}") for i in range(devices)]
    dst = [torch.empty(n, dtype=torch.bfloat16, pin_memory=True) for _ in range(devices)]

    def copy(i: int) -> None:
        with torch.cuda.device(i):
            dst[i].copy_(src[i], non_blocking=True)
            torch.cuda.synchronize(i)

    best = 0.0
    for _ in range(3):
        threads = [threading.Thread(target=copy, args=(i,)) for i in range(devices)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        best = max(best, devices * n * 2 / (time.perf_counter() - t0) / 1e9)
    return best


def run(
    root: Path, tp: int, args: argparse.Namespace, work: Path, first_step: int
) -> dict[str, Any]:
    handles = work / f"tp{tp}" / "handles.pt"
    ctx = mp.get_context("spawn")
    conns, procs = [], []
    for i in range(tp):
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(
            target=producer,
            args=(str(root), tp, i, str(handles), args.modulus, args.density, theirs),
        )
        proc.start()
        conns.append(mine)
        procs.append(proc)

    def expect(word: str) -> None:
        for i, c in enumerate(conns):
            got = c.recv()
            if got != word:
                raise RuntimeError(f"rank {i}: {got}")

    out: dict[str, Any] = {"tp": tp, "steps": []}
    try:
        expect("ready")
        journal = not args.no_journal
        t0 = time.perf_counter()
        r = sync(root, handles=handles, journal=journal)
        out["unchanged_s"] = time.perf_counter() - t0
        out["compared"] = r.total_compared
        for k in range(args.steps):
            for c in conns:
                c.send(first_step + k)
            expect("stepped")
            t0 = time.perf_counter()
            r = sync(root, handles=handles, journal=journal)
            s = time.perf_counter() - t0
            out["steps"].append(
                {"s": s, "changed": r.total_changed, "written": r.bytes_written, "log": r.log_bytes}
            )
        with open_handles(handles) as h:
            bad = mismatches(ModelDir.open(root), h.tensors)
        if bad:
            raise AssertionError(f"tp {tp}: files differ from the live tensors: {bad[:5]}")
    finally:
        for c in conns:
            c.send("exit")
        for p in procs:
            p.join(120)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tp", default="1,2,4")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--modulus", type=int, default=50)
    ap.add_argument(
        "--density",
        type=float,
        default=0.0,
        help="flip this share of elements at seeded random positions instead of --modulus",
    )
    ap.add_argument("--no-journal", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    sizes = [int(x) for x in args.tp.split(",")]
    if max(sizes) > torch.cuda.device_count():
        sys.exit(f"needs {max(sizes)} GPUs, {torch.cuda.device_count()} here")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="apollo-tp-", dir=args.out))
    root = work / "model"
    t0 = time.perf_counter()
    make_checkpoint(root, args.layers)
    print(
        f"checkpoint: {sum(f.stat().st_size for f in root.iterdir()) / 1e9:.2f} GB "
        f"in {time.perf_counter() - t0:.1f} s at {root}"
    )
    results = [run(root, tp, args, work, i * args.steps) for i, tp in enumerate(sizes)]
    for r in results:
        r["d2h_gbps"] = d2h(r["tp"])
        torch.cuda.empty_cache()
    print(
        f"{'tp':>3} {'GB':>6} {'unchanged s':>12} {'changed s':>10} {'GB/s':>6} "
        f"{'changed MB':>11} {'log MB':>8} {'D2H GB/s':>9} {'of D2H':>7}"
    )
    for r in results:
        for st in r["steps"]:
            print(
                f"{r['tp']:>3} {r['compared'] / 1e9:>6.2f} {r['unchanged_s']:>12.2f} "
                f"{st['s']:>10.2f} {r['compared'] / st['s'] / 1e9:>6.2f} "
                f"{st['changed'] / 1e6:>11.1f} {st['log'] / 1e6:>8.1f} {r['d2h_gbps']:>9.1f} "
                f"{r['compared'] / st['s'] / 1e9 / r['d2h_gbps']:>7.2f}"
            )
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(f"results: {work / 'results.json'}")


if __name__ == "__main__":
    main()
