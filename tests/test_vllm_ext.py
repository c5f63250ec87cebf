"""The vLLM worker extension, driven through a minimal stand-in of vLLM's worker.

The stand-in has exactly what the extension reads from a vLLM worker (documented
interface): ``model_runner.model`` (an ``nn.Module`` with vLLM's parameter names
and merged layouts), ``vllm_config`` (model, parallel and LoRA configs) and
``rank``; the extension class is mixed into it as vLLM mixes it into its worker.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from apollo_sync import HandlesError, RefusedError, load_handles, sync
from apollo_sync.vllm_ext import ApolloSyncWorkerExtension
from conftest import dir_digest, randn

Factory = Callable[..., Path]


class UnquantizedFusedMoEMethod:
    """Stands in for vLLM's method of the same name (the extension reads its name
    and its settings)."""

    def __init__(self, **settings: Any) -> None:
        self.__dict__.update(settings)


def checkpoint() -> dict[str, torch.Tensor]:
    p = "model.layers.0."
    out = {
        "model.embed_tokens.weight": randn(100, 16, seed=1),
        p + "self_attn.q_proj.weight": randn(16, 16, seed=2),
        p + "self_attn.k_proj.weight": randn(8, 16, seed=3),
        p + "self_attn.v_proj.weight": randn(8, 16, seed=4),
    }
    for e in range(3):
        out[p + f"mlp.experts.{e}.gate_proj.weight"] = randn(4, 16, seed=10 + e)
        out[p + f"mlp.experts.{e}.up_proj.weight"] = randn(4, 16, seed=20 + e)
        out[p + f"mlp.experts.{e}.down_proj.weight"] = randn(16, 4, seed=30 + e)
    return out


def vllm_module(hf: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module whose named_parameters() are vLLM's for this checkpoint."""
    p = "model.layers.0."
    root = torch.nn.Module()
    model = root.model = torch.nn.Module()
    model.embed_tokens = torch.nn.Module()
    padded = torch.cat([hf["model.embed_tokens.weight"], torch.zeros(28, 16, dtype=torch.bfloat16)])
    model.embed_tokens.weight = torch.nn.Parameter(padded)
    layer = torch.nn.Module()
    model.layers = torch.nn.ModuleList([layer])
    layer.self_attn = torch.nn.Module()
    layer.self_attn.qkv_proj = torch.nn.Module()
    qkv = torch.cat([hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
    layer.self_attn.qkv_proj.weight = torch.nn.Parameter(qkv)
    layer.mlp = torch.nn.Module()
    experts = layer.mlp.experts = torch.nn.Module()
    w13 = torch.stack(
        [
            torch.cat([hf[p + f"mlp.experts.{e}.{x}_proj.weight"] for x in ("gate", "up")])
            for e in range(3)
        ]
    )
    experts.w13_weight = torch.nn.Parameter(w13)
    w2 = torch.stack([hf[p + f"mlp.experts.{e}.down_proj.weight"] for e in range(3)])
    experts.w2_weight = torch.nn.Parameter(w2)
    experts.quant_method = UnquantizedFusedMoEMethod(use_triton=True)
    root.lm_head = torch.nn.Module()
    root.lm_head.weight = model.embed_tokens.weight  # tied: listed once
    return root


class StandInWorker(ApolloSyncWorkerExtension):
    def __init__(self, model_dir: Path, module: torch.nn.Module, **overrides: Any) -> None:
        self.rank = overrides.pop("rank", 0)
        model_cfg = SimpleNamespace(
            model=str(model_dir),
            revision=None,
            hf_config=SimpleNamespace(architectures=["Qwen3MoeForCausalLM"]),
            dtype=torch.bfloat16,
            quantization=overrides.pop("quantization", None),
        )
        parallel = SimpleNamespace(
            tensor_parallel_size=overrides.pop("tp", 1),
            pipeline_parallel_size=1,
            enable_expert_parallel=False,
        )
        self.vllm_config = SimpleNamespace(
            model_config=model_cfg,
            parallel_config=parallel,
            lora_config=overrides.pop("lora_config", None),
        )
        self.model_runner = SimpleNamespace(model=module)
        assert not overrides


@pytest.fixture
def served(model_factory: Factory) -> tuple[Path, torch.nn.Module]:
    hf = checkpoint()
    root = model_factory(hf, shards=2)
    (root / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    return root, vllm_module(hf)


def test_import_needs_no_vllm() -> None:
    code = (
        "import sys; sys.modules['vllm'] = None\n"  # any import of vllm would fail
        "import apollo_sync.vllm_ext as m\n"
        "assert m.ApolloSyncWorkerExtension.apollo_export_handles\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_export_metadata_and_sync_through_handles(
    served: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    root, module = served
    worker = StandInWorker(root, module)
    path = worker.apollo_export_handles(str(tmp_path / "run" / "handles.pt"))
    assert path == str(tmp_path / "run" / "handles.pt")
    with load_handles(path) as h:
        meta = h.metadata
        assert sorted(h.tensors) == sorted(n for n, _ in module.named_parameters())
    assert meta["model_path"] == str(root.resolve())
    assert meta["architecture"] == "Qwen3MoeForCausalLM"
    assert (meta["tensor_parallel_size"], meta["tensor_parallel_rank"]) == (1, 0)
    assert meta["dtype"] == "BF16" and meta["quantization"] is None
    assert meta["lora_enabled"] is False and meta["moe_repacked"] == []
    assert "vllm_version" not in meta  # no vLLM here: nothing made up

    # training changes the served weights in place; the sync finds the files itself
    with torch.no_grad():
        module.model.layers[0].mlp.experts.w13_weight[2, 5] += 1
        module.model.embed_tokens.weight[99] += 1
    r = sync(handles=path)
    assert r.tensors_synced == 1 + 3 + 9 and r.total_changed > 0  # embedding, q k v, experts
    disk: dict[str, torch.Tensor] = {}
    for f in root.glob("*.safetensors"):
        disk |= load_file(f)
    w13 = module.model.layers[0].mlp.experts.w13_weight.detach()
    assert torch.equal(disk["model.layers.0.mlp.experts.2.up_proj.weight"], w13[2, 4:])
    assert torch.equal(
        disk["model.embed_tokens.weight"], module.model.embed_tokens.weight.detach()[:100]
    )


def test_one_rank_of_several_is_not_synced_alone(
    served: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    root, module = served
    path = StandInWorker(root, module, tp=2, rank=1).apollo_export_handles(
        str(tmp_path / "handles.pt")
    )
    assert path.endswith("handles.pt.rank1")
    digest = dir_digest(root)
    with pytest.raises(HandlesError, match=r"handles.pt: no handles file for rank 0"):
        sync(handles=path)  # the set is looked for from rank 0's path
    # the file by itself says why it cannot be synced alone
    with load_handles(path) as h, pytest.raises(RefusedError, match="one rank's slice"):
        sync(handles=h)
    assert dir_digest(root) == digest


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"quantization": "fp8"}, "quantization 'fp8'"),
        ({"lora_config": SimpleNamespace(max_loras=1)}, "LoRA"),
        ({"moe": UnquantizedFusedMoEMethod(rocm_aiter_moe_enabled=True)}, "rocm_aiter"),
        ({"moe": UnquantizedFusedMoEMethod(backend="FLASHINFER_TRTLLM")}, "FLASHINFER"),
    ],
)
def test_settings_that_change_the_weights_are_refused(
    served: tuple[Path, torch.nn.Module], tmp_path: Path, overrides: dict[str, Any], match: str
) -> None:
    root, module = served
    moe = overrides.pop("moe", None)
    if moe is not None:
        module.model.layers[0].mlp.experts.quant_method = moe
    worker = StandInWorker(root, module, **overrides)
    path = worker.apollo_export_handles(str(tmp_path / "handles.pt"))
    with torch.no_grad():
        module.model.layers[0].self_attn.qkv_proj.weight += 1
    digest = dir_digest(root)
    with pytest.raises(RefusedError, match=match):
        sync(handles=path)
    assert dir_digest(root) == digest
