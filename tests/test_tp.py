"""Tensor-, pipeline- and expert-parallel ranks synced as one producer, on the CPU.

Each rank is a stand-in of the model vLLM holds on that rank, built by the
independent sharding helper (:mod:`vllm_sharding`, from vLLM's weight loaders)
from a real transformers checkpoint, and exported through the worker extension
as vLLM would call it on every worker (``collective_rpc``): its CPU tensors move
into shared memory and every rank writes its own handles file. Then training-like
changes land on the unsharded truth and are put into every rank's tensors in
place (sharded the same way), one sync of rank 0's path writes them, and the
files must equal the truth tensor by tensor, ``from_pretrained`` must give the
truth's logits, and a second sync must find nothing to write.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import apollo_sync.tp
from apollo_sync import HandlesError, RefusedError, export_handles, history, sync
from apollo_sync.cli import main as cli_main
from apollo_sync.diagnose import diagnose
from apollo_sync.live import from_torch
from apollo_sync.ranks import open_handles
from apollo_sync.tp import assemble
from apollo_sync.vllm_ext import ApolloSyncWorkerExtension, partitions
from apollo_sync.watch import watch
from conftest import dir_digest
from vllm_sharding import Rank, Shape, shard

transformers = pytest.importorskip("transformers")

VOCAB = 200  # padded to 256: at tp 8 the last rank holds only padding rows


class Worker(ApolloSyncWorkerExtension):
    """What the extension reads from one vLLM worker (see test_vllm_ext.py)."""

    def __init__(self, root: Path, rank: Rank, tp: int, pp: int, **extra: Any) -> None:
        self.rank = rank.pp_rank * tp + rank.tp_rank
        model_cfg = SimpleNamespace(
            model=str(root),
            revision=None,
            hf_config=SimpleNamespace(architectures=[extra.pop("arch", "Qwen3ForCausalLM")]),
            dtype=torch.bfloat16,
            quantization=extra.pop("quantization", None),
        )
        parallel = SimpleNamespace(
            tensor_parallel_size=tp,
            pipeline_parallel_size=pp,
            enable_expert_parallel=extra.pop("ep", False),
        )
        self.vllm_config = SimpleNamespace(
            model_config=model_cfg,
            parallel_config=parallel,
            lora_config=None,
            instance_id=extra.pop("instance", "engine-1"),
        )
        self.model_runner = SimpleNamespace(model=rank.model)
        assert not extra


def configs() -> dict[str, tuple[Any, Shape]]:
    common: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "head_dim": 8,
    }
    out = {
        "qwen3": (
            transformers.Qwen3Config(
                **common, intermediate_size=128, num_attention_heads=8, num_key_value_heads=4
            ),
            Shape(heads=8, kv_heads=4, head_dim=8, vocab=VOCAB),
        ),
        "qwen3_moe": (
            transformers.Qwen3MoeConfig(
                **common,
                intermediate_size=128,
                num_attention_heads=4,
                num_key_value_heads=2,
                moe_intermediate_size=32,
                num_experts=8,
                num_experts_per_tok=2,
                norm_topk_prob=True,
            ),
            Shape(heads=4, kv_heads=2, head_dim=8, vocab=VOCAB, experts=8, moe_inter=32),
        ),
    }
    qwen35 = getattr(transformers, "Qwen3_5TextConfig", None)
    if qwen35 is not None:
        out["qwen3_5"] = (
            qwen35(
                **common,
                intermediate_size=128,
                num_attention_heads=4,
                num_key_value_heads=2,
                linear_num_value_heads=8,
                linear_num_key_heads=4,
                linear_key_head_dim=8,
                linear_value_head_dim=8,
                layer_types=["linear_attention", "full_attention"],
            ),
            Shape(
                heads=4,
                kv_heads=2,
                head_dim=8,
                vocab=VOCAB,
                gdn_key_dim=32,
                gdn_value_dim=64,
                gdn_v_heads=8,
                prefix="language_model.",
            ),
        )
    return out


CONFIGS = configs()


def read_dir(root: Path) -> dict[str, torch.Tensor]:
    """The directory's tensors, copied: a safetensors release that maps the file
    would otherwise hand back tensors that a sync changes under the caller."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(root.glob("*.safetensors")):
        out |= {k: v.clone() for k, v in load_file(f).items()}
    return out


def make_model(tmp_path: Path, arch: str) -> tuple[Path, dict[str, torch.Tensor]]:
    cfg, _ = CONFIGS[arch]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    root = tmp_path / arch
    model.save_pretrained(root, max_shard_size="40KB")
    assert len(list(root.glob("*.safetensors"))) > 1
    return root, read_dir(root)


def serve(
    root: Path,
    hf: dict[str, torch.Tensor],
    shape: Shape,
    handles: Path,
    tp: int,
    pp: int = 1,
    ep: str | None = None,
    **extra: Any,
) -> list[Rank]:
    """Every rank built and exported, as ``collective_rpc("apollo_export_handles")``."""
    ranks = shard(hf, shape, tp, pp=pp, layers=2, ep=ep)
    for r in ranks:
        worker = Worker(root, r, tp, pp, ep=ep is not None, **extra)
        path = Path(worker.apollo_export_handles(str(handles)))
        n = r.pp_rank * tp + r.tp_rank
        assert path == (handles if n == 0 else handles.with_name(f"{handles.name}.rank{n}"))
    return ranks


def changed(hf: dict[str, torch.Tensor], seed: int = 5) -> dict[str, torch.Tensor]:
    """A training-like change of the truth: most tensors, a few percent of their
    elements (deterministic: every process that needs it computes the same)."""
    g = torch.Generator().manual_seed(seed)
    truth = {}
    for i, (name, t) in enumerate(sorted(hf.items())):
        if i % 7 == 3:  # some tensors untouched
            truth[name] = t.clone()
            continue
        mask = torch.rand(t.shape, generator=g) < 0.05
        step = torch.randn(t.shape, generator=g).to(t.dtype) * 0.1
        truth[name] = torch.where(mask, t + step, t)
    return truth


def put(rank: Rank, new: Rank) -> None:
    """``new``'s values into ``rank``'s tensors, in place (where they are served)."""
    fresh = dict(new.model.named_parameters())
    with torch.no_grad():
        for name, p in rank.model.named_parameters():
            p.copy_(fresh[name])


def train(
    ranks: list[Rank],
    hf: dict[str, torch.Tensor],
    shape: Shape,
    tp: int,
    pp: int,
    ep: str | None,
    seed: int = 5,
) -> dict[str, torch.Tensor]:
    """:func:`changed` put into every rank's tensors in place; returns the new truth."""
    truth = changed(hf, seed)
    for old, new in zip(ranks, shard(truth, shape, tp, pp=pp, layers=2, ep=ep), strict=True):
        put(old, new)
    return truth


def check_files(root: Path, truth: dict[str, torch.Tensor]) -> None:
    after = read_dir(root)
    assert set(after) == set(truth)
    for name, t in truth.items():
        assert torch.equal(after[name], t), name


def check_logits(root: Path, truth: dict[str, torch.Tensor]) -> None:
    """``from_pretrained`` of the synced directory gives the logits of the truth
    (saved whole beside it, so that transformers converts both the same way)."""
    whole = root.with_name(root.name + "-truth")
    whole.mkdir()
    shutil.copy(root / "config.json", whole / "config.json")
    save_file(truth, str(whole / "model.safetensors"), metadata={"format": "pt"})
    expected = transformers.AutoModelForCausalLM.from_pretrained(whole, dtype=torch.bfloat16)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(root, dtype=torch.bfloat16)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    expected.eval()
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(expected(input_ids=ids).logits, reloaded(input_ids=ids).logits)


CASES = [
    ("qwen3", 2, 1, None),
    ("qwen3", 4, 1, None),
    ("qwen3", 8, 1, None),  # 8 ranks > 4 KV heads: K/V rows held by 2 ranks each
    ("qwen3", 2, 2, None),  # pipeline stages of 1 layer, tensor-parallel 2 within
    ("qwen3_moe", 2, 1, None),
    ("qwen3_moe", 4, 1, None),
    ("qwen3_moe", 4, 1, "round_robin"),  # whole experts per rank, not contiguous
    ("qwen3_5", 2, 1, None),
    ("qwen3_5", 4, 1, None),
]


@pytest.mark.parametrize(("arch", "tp", "pp", "ep"), CASES)
def test_ranks_sync_to_the_unsharded_truth(
    tmp_path: Path, arch: str, tp: int, pp: int, ep: str | None
) -> None:
    if arch not in CONFIGS:
        pytest.skip(f"transformers {transformers.__version__} has no {arch}")
    _, shape = CONFIGS[arch]
    root, hf = make_model(tmp_path, arch)
    handles = tmp_path / "run" / "handles.pt"
    ranks = serve(root, hf, shape, handles, tp, pp, ep)
    if tp == 8:  # the helper did replicate K/V: ranks 2k and 2k+1 hold the same rows
        q = "model.layers.0.self_attn.qkv_proj.weight"
        a, b = (dict(ranks[i].model.named_parameters())[q] for i in (2, 3))
        assert torch.equal(a[8:], b[8:]) and not torch.equal(a[:8], b[:8])

    truth = train(ranks, hf, shape, tp, pp, ep)
    result = sync(handles=handles)
    assert result.total_changed > 0 and result.tensors_missing == 0
    assert result.tensors_synced == len(hf) - ("lm_head.weight" not in hf)
    check_files(root, truth)
    check_logits(root, truth)
    again = sync(handles=handles)
    assert again.total_changed == 0 and again.bytes_written == 0


def test_any_byte_range_of_a_full_tensor_is_the_truth() -> None:
    """Row-parallel strips, merged sections with K/V replicas, the vocabulary and
    experts, cut anywhere (a range may start and end inside a row)."""
    cfg, shape = CONFIGS["qwen3_moe"]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    hf = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    hf |= {  # transformers 5 fuses experts in memory: the checkpoint's names
        f"model.layers.{i}.mlp.experts.{e}.{p}.weight": t
        for i in range(2)
        for e in range(8)
        for p, t in zip(
            ("gate_proj", "up_proj", "down_proj"),
            (
                *hf[f"model.layers.{i}.mlp.experts.gate_up_proj"][e].chunk(2),
                hf[f"model.layers.{i}.mlp.experts.down_proj"][e],
            ),
            strict=True,
        )
    }
    for i in range(2):
        del hf[f"model.layers.{i}.mlp.experts.gate_up_proj"]
        del hf[f"model.layers.{i}.mlp.experts.down_proj"]
    for ep in (None, "round_robin"):
        ranks = shard(hf, shape, 4, layers=2, ep=ep)
        sets = [
            (
                {n: from_torch(n, p) for n, p in r.model.named_parameters()},
                partitions(r.model, r.tp_rank, 4),
            )
            for r in ranks
        ]
        full = assemble(sets)
        p = "model.layers.1."
        truth = {
            p + "self_attn.o_proj.weight": hf[p + "self_attn.o_proj.weight"],
            p + "self_attn.qkv_proj.weight": torch.cat(
                [hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]
            ),
            "model.embed_tokens.weight": hf["model.embed_tokens.weight"],
            p + "mlp.experts.w2_weight": torch.stack(
                [hf[p + f"mlp.experts.{e}.down_proj.weight"] for e in range(8)]
            ),
        }
        g = torch.Generator().manual_seed(1)
        for name, t in truth.items():
            want = t.contiguous().view(torch.uint8).reshape(-1).numpy()
            source = full[name].source
            assert full[name].shape == tuple(t.shape)
            cuts = torch.randint(0, len(want), (40,), generator=g).tolist()
            for a, b in [(0, len(want)), *zip(cuts[::2], cuts[1::2], strict=True)]:
                a, b = min(a, b), max(a, b)
                assert (source[a:b] == want[a:b]).all(), (name, ep, a, b)


def test_chunks_that_cut_blocks_and_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Staging buffers far smaller than a tensor, not a multiple of a block or a
    row: each 4 KiB block assembled across chunk boundaries still lands whole."""
    monkeypatch.setattr(apollo_sync.tp, "CHUNK_BYTES", 3000)
    _, shape = CONFIGS["qwen3"]
    root, hf = make_model(tmp_path, "qwen3")
    handles = tmp_path / "run" / "handles.pt"
    ranks = serve(root, hf, shape, handles, 4)
    truth = train(ranks, hf, shape, 4, 1, None)
    assert sync(handles=handles).total_changed > 0
    check_files(root, truth)


def test_any_rank_path_or_the_list_finds_the_set(tmp_path: Path) -> None:
    _, shape = CONFIGS["qwen3"]
    root, hf = make_model(tmp_path, "qwen3")
    handles = tmp_path / "run" / "handles.pt"
    ranks = serve(root, hf, shape, handles, 4)
    truth = train(ranks, hf, shape, 4, 1, None)
    paths = [handles, *(handles.with_name(f"handles.pt.rank{n}") for n in (3, 1, 2))]
    with open_handles(paths[2]) as h:  # rank 1's path: the set is found from rank 0's
        assert h.metadata["rank_set"] == 4 and h.path == handles
    d = diagnose(handles=paths[1])
    assert not d.only_live and not d.mismatched and not d.refusals and not d.only_disk
    assert sync(handles=paths).total_changed > 0  # every rank's path, in any order
    check_files(root, truth)


def test_watch_and_the_cli_take_a_set(tmp_path: Path) -> None:
    _, shape = CONFIGS["qwen3"]
    root, hf = make_model(tmp_path, "qwen3")
    handles = tmp_path / "run" / "handles.pt"
    ranks = serve(root, hf, shape, handles, 2)
    truth = train(ranks, hf, shape, 2, 1, None)
    summary = watch(handles=handles, count=1)
    assert summary.syncs == 1
    check_files(root, truth)
    truth = train(ranks, truth, shape, 2, 1, None, seed=6)
    rank1 = handles.with_name("handles.pt.rank1")
    assert cli_main(["sync", "--handles", str(rank1), str(handles)]) == 0
    check_files(root, truth)


def _served(tmp_path: Path, tp: int = 4) -> tuple[Path, Path, list[Rank]]:
    _, shape = CONFIGS["qwen3"]
    root, hf = make_model(tmp_path, "qwen3")
    handles = tmp_path / "run" / "handles.pt"
    return root, handles, serve(root, hf, shape, handles, tp)


def test_an_incomplete_set_is_refused(tmp_path: Path) -> None:
    root, handles, ranks = _served(tmp_path)
    with torch.no_grad():
        dict(ranks[1].model.named_parameters())["model.norm.weight"].add_(1)
    digest = dir_digest(root)
    handles.with_name("handles.pt.rank2").unlink()
    with pytest.raises(HandlesError, match=r"no handles file for rank 2 of 4"):
        sync(handles=handles)
    listed = [handles, *(handles.with_name(f"handles.pt.rank{n}") for n in (1, 3))]
    with pytest.raises(HandlesError, match=r"lacks rank\(s\) 2 of 4"):
        sync(handles=listed)
    assert dir_digest(root) == digest


def test_ranks_of_two_exports_are_not_one_set(tmp_path: Path) -> None:
    root, handles, ranks = _served(tmp_path, tp=2)
    Worker(root, ranks[1], 2, 1, instance="engine-2").apollo_export_handles(str(handles))
    digest = dir_digest(root)
    with pytest.raises(HandlesError, match=r"not one producer: export 'engine-2' != 'engine-1'"):
        sync(handles=handles)
    assert dir_digest(root) == digest


def test_diverged_kv_replicas_are_refused(tmp_path: Path) -> None:
    root, handles, ranks = _served(tmp_path, tp=8)
    with torch.no_grad():  # rank 5 alone changes its copy of KV head 2's rows
        dict(ranks[5].model.named_parameters())["model.layers.1.self_attn.qkv_proj.weight"][
            9, 3
        ] += 1
    digest = dir_digest(root)
    # found while the bytes stream (under the lock): the sync is undone, the files stay
    with pytest.raises(RefusedError, match=r"rank 5 holds a replica .* differs"):
        sync(handles=handles)
    after = {k: v for k, v in dir_digest(root).items() if not k.startswith(".apollo_sync/")}
    assert after == digest
    assert history(root).generation == 0


def test_replicated_parameters_must_agree(tmp_path: Path) -> None:
    _, handles, ranks = _served(tmp_path, tp=2)
    with torch.no_grad():
        dict(ranks[1].model.named_parameters())["model.norm.weight"][0] += 1
    with pytest.raises(RefusedError, match=r"model.norm.weight: rank 1 holds a replica"):
        sync(handles=handles)


def test_nonzero_vocab_padding_is_refused(tmp_path: Path) -> None:
    root, handles, ranks = _served(tmp_path, tp=8)
    with torch.no_grad():  # rank 7 holds rows 224..256: all padding
        dict(ranks[7].model.named_parameters())["model.embed_tokens.weight"][3, 0] = 1
    digest = dir_digest(root)
    with pytest.raises(RefusedError, match=r"rank 7's vocabulary padding rows 0..32 are not zero"):
        sync(handles=handles)
    assert dir_digest(root) == digest


def test_what_stays_refused_is_still_refused(tmp_path: Path) -> None:
    _, shape = CONFIGS["qwen3"]
    root, hf = make_model(tmp_path, "qwen3")
    handles = tmp_path / "run" / "handles.pt"
    ranks = serve(root, hf, shape, handles, 2, quantization="fp8")
    with pytest.raises(RefusedError, match=r"quantization 'fp8'"):
        sync(handles=handles)
    assert len(ranks) == 2  # alive until here: their memory backs the handles


def test_handles_of_an_older_extension_are_refused(tmp_path: Path) -> None:
    """Rank files without the partition records (or without ranks) are not guessed at."""
    t = torch.zeros(4, 4)
    handles = tmp_path / "run" / "handles.pt"
    meta: dict[str, Any] = {"model_path": str(tmp_path), "tensor_parallel_size": 2}
    export_handles({"w": t}, handles, metadata=meta | {"tensor_parallel_rank": 0})
    rank1 = handles.with_name("handles.pt.rank1")
    export_handles({"w": t}, rank1, metadata=meta | {"tensor_parallel_rank": 1})
    with pytest.raises(HandlesError, match=r"records no rank .* older apollo_sync"):
        open_handles(handles)
    for n, path in enumerate((handles, rank1)):
        ranks = {"rank": n, "tensor_parallel_rank": n, "pipeline_parallel_rank": 0}
        export_handles({"w": t}, path, metadata=meta | ranks)
    with pytest.raises(HandlesError, match=r"no partition metadata .* older apollo_sync"):
        open_handles(handles)
    export_handles({"w": t}, rank1, metadata=meta | ranks | {"partitions": '{"w": {"rule": 3}}'})
    export_handles(
        {"w": t},
        handles,
        metadata=meta | ranks | {"rank": 0, "tensor_parallel_rank": 0, "partitions": "{}"},
    )
    with pytest.raises(HandlesError, match=r"w: malformed partition record"):
        open_handles(handles)


def test_added_vocabulary_is_refused(tmp_path: Path) -> None:
    _, shape = CONFIGS["qwen3"]
    root, hf = make_model(tmp_path, "qwen3")
    ranks = shard(hf, shape, 2, layers=2)
    handles = tmp_path / "run" / "handles.pt"
    for r in ranks:  # LoRA's extra vocabulary, sharded apart from the base rows
        r.model.model.embed_tokens.num_added_embeddings = 16
        Worker(root, r, 2, 1).apollo_export_handles(str(handles))
    with pytest.raises(RefusedError, match=r"16 vocabulary rows added"):
        sync(handles=handles)


def test_partition_metadata_is_recorded_per_rank(tmp_path: Path) -> None:
    """What the extension records is vLLM's layer objects' description, per rank."""
    _, shape = CONFIGS["qwen3"]
    root, hf = make_model(tmp_path, "qwen3")
    ranks = shard(hf, shape, 8, layers=2)
    meta = Worker(root, ranks[5], 8, 1).apollo_metadata()
    assert (meta["rank"], meta["tensor_parallel_rank"], meta["pipeline_parallel_rank"]) == (5, 5, 0)
    specs = json.loads(meta["partitions"])
    assert specs["model.layers.0.self_attn.qkv_proj.weight"] == {
        "rule": "column",
        "dim": 0,
        "tp": [5, 8],
        "sizes": [64, 32, 32],
        "replicas": [1, 2, 2],
    }
    row = {"rule": "row", "dim": 1, "tp": [5, 8]}
    assert specs["model.layers.0.self_attn.o_proj.weight"] == row
    assert specs["model.embed_tokens.weight"]["org"] == VOCAB
    assert specs["model.embed_tokens.weight"]["padded"] == 256
    assert "model.norm.weight" not in specs  # replicated
