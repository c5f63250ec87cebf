"""The vLLM side: a worker extension that exports the served weights' handles.

vLLM mixes the class named by ``--worker-extension-cls`` (``worker_extension_cls=``
for ``LLM``) into its GPU worker class, so its methods run inside each worker
process with the worker as ``self``, and ``collective_rpc(method, args=...)``
calls them on every worker. :class:`ApolloSyncWorkerExtension` adds:

* ``apollo_export_handles(path=None)``: writes a handles file for the worker's
  parameters (``model_runner.model.named_parameters()``, which lists a tied LM
  head once) with :func:`apollo_sync.export_handles`, and returns its path;
* ``apollo_metadata()``: the metadata that goes with them (below), for a look
  before exporting.

The metadata is what a sync needs to find the files and to refuse what it cannot
write back byte for byte (:mod:`apollo_sync.refusals`): ``model_path``,
``architecture``, ``vllm_version``, ``tensor_parallel_rank`` / ``_size``,
``pipeline_parallel_rank`` / ``_size``, ``rank`` (``pp_rank * tp_size + tp_rank``:
the ``.rank<N>`` suffix), ``export`` (the engine's ``instance_id``, the same on
every rank of one engine), ``dtype``, ``quantization``, ``lora_enabled``,
``expert_parallel``, ``eplb``, ``moe_repacked`` (fused-MoE layers whose kernel
settings suggest reordered, shuffled or padded expert weights), ``partitions``
(how vLLM's layer objects split each parameter over the ranks, read from them:
see :func:`partitions` and :mod:`apollo_sync.tp`), and the GPU's UUID (added by
``export_handles``). Every attribute is read defensively: this module is written
against vLLM's documented worker interface (``self.model_runner.model``,
``self.vllm_config``, ``self.rank``) and imports nothing from vLLM at import time,
so it loads where vLLM is not installed.
"""

from __future__ import annotations

import enum
import json
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from apollo_sync.dtypes import st_dtype
from apollo_sync.handles import default_handles_path, export_handles
from apollo_sync.tp import PARTITIONS_KEY, Spec

#: Words in a fused-MoE method's settings that mean the expert weights are laid
#: out for a kernel (shuffled, reordered, padded) rather than as loaded.
_REPACKING_WORDS: tuple[str, ...] = (
    "aiter",
    "flashinfer",
    "trtllm",
    "marlin",
    "shuffle",
    "cutlass",
    "padded",
)


class ApolloSyncWorkerExtension:
    """Mixed into vLLM's worker by ``--worker-extension-cls
    apollo_sync.vllm_ext.ApolloSyncWorkerExtension`` (see the module docs)."""

    # Set by vLLM's worker (the class this is mixed into).
    model_runner: Any
    vllm_config: Any
    rank: int

    def apollo_metadata(self) -> dict[str, Any]:
        """The handles metadata for this worker (see the module docs)."""
        return worker_metadata(self)

    def apollo_export_handles(self, path: str | None = None) -> str:
        """Exports this worker's parameters; returns the handles file's path.

        With tensor or pipeline parallelism each rank writes its own file:
        ``.rank<N>`` (``N = pp_rank * tp_size + tp_rank``) is appended to the path
        of every rank but rank 0, whose path finds the others.
        """
        meta = worker_metadata(self)
        target = Path(path) if path else default_handles_path()
        rank = meta.get("rank", 0)
        if isinstance(rank, int) and rank > 0:
            target = target.with_name(f"{target.name}.rank{rank}")
        params = dict(self.model_runner.model.named_parameters())
        return str(export_handles(params, target, metadata=meta))


def worker_metadata(worker: Any) -> dict[str, Any]:
    """Metadata for the handles of ``worker`` (a vLLM worker, or a stand-in with
    the same attributes); keys whose source is missing are left out."""
    cfg = getattr(worker, "vllm_config", None)
    model_cfg = getattr(cfg, "model_config", None)
    parallel = getattr(cfg, "parallel_config", None)
    meta: dict[str, Any] = {}
    model = getattr(model_cfg, "model", None)
    if isinstance(model, str):
        meta["model"] = model
        local = _local_model_dir(model, getattr(model_cfg, "revision", None))
        if local is not None:
            meta["model_path"] = local
    archs = getattr(getattr(model_cfg, "hf_config", None), "architectures", None)
    if isinstance(archs, list | tuple) and archs:
        meta["architecture"] = str(archs[0])
    version = _vllm_version()
    if version is not None:
        meta["vllm_version"] = version
    tp = getattr(parallel, "tensor_parallel_size", None)
    if isinstance(tp, int):
        meta["tensor_parallel_size"] = tp
    tp_rank = meta["tensor_parallel_rank"] = _tp_rank(worker, tp)
    pp = getattr(parallel, "pipeline_parallel_size", None)
    if isinstance(pp, int):
        meta["pipeline_parallel_size"] = pp
    tp_size = tp if isinstance(tp, int) and tp > 0 else 1
    pp_rank = meta["pipeline_parallel_rank"] = _pp_rank(worker, tp_size)
    meta["rank"] = pp_rank * tp_size + tp_rank
    instance = getattr(cfg, "instance_id", None)
    meta["export"] = str(instance) if instance else f"ppid-{os.getppid()}"
    dtype = getattr(model_cfg, "dtype", None)
    if isinstance(dtype, torch.dtype):
        meta["dtype"] = st_dtype(dtype)
    quant = getattr(model_cfg, "quantization", None)
    meta["quantization"] = None if quant is None else str(quant)
    meta["lora_enabled"] = getattr(cfg, "lora_config", None) is not None
    meta["expert_parallel"] = bool(getattr(parallel, "enable_expert_parallel", False))
    meta["eplb"] = bool(getattr(parallel, "enable_eplb", False))
    model_obj = getattr(getattr(worker, "model_runner", None), "model", None)
    if isinstance(model_obj, torch.nn.Module):
        meta["moe_repacked"] = list(_repacked_moe(model_obj))
        specs = partitions(model_obj, tp_rank, tp_size)
        meta[PARTITIONS_KEY] = json.dumps({k: v.to_json() for k, v in sorted(specs.items())})
    return meta


def partitions(model: torch.nn.Module, tp_rank: int, tp_size: int) -> dict[str, Spec]:
    """How each parameter of ``model`` is split over the ranks, as vLLM's layer
    objects describe it (the rules are :mod:`apollo_sync.tp`'s). Layers are
    known by their class names (this module imports nothing from vLLM), their
    settings by vLLM's attribute names; a parameter not listed is replicated.

    * ``QKVParallelLinear``: sections q, k, v of ``total_num_heads`` /
      ``total_num_kv_heads`` heads of ``head_size`` (``v_head_size``), k and v with
      ``num_kv_head_replicas``;
    * ``MergedColumnParallelLinear``: sections ``output_sizes``;
      ``ColumnParallelLinear``: one section of ``output_size``; along the
      parameter's ``output_dim`` (none: replicated);
    * ``RowParallelLinear``: along the parameter's ``input_dim`` (the bias has
      none: replicated);
    * ``VocabParallelEmbedding`` / ``ParallelLMHead``: ``org_vocab_size`` rows of
      ``num_embeddings_padded`` (added LoRA vocabulary is refused at sync);
    * ``FusedMoE``: ``w13_weight`` (gate and up halves of
      ``intermediate_size_per_partition``) and ``w2_weight``, the global id of each
      local expert from ``expert_map``;
    * a GDN mixer (a module with ``conv1d``, ``key_dim``, ``value_dim``,
      ``num_v_heads``: Qwen3-Next / Qwen3.5 ``GatedDeltaNet``): ``conv1d.weight``
      in sections key, key, value (``mamba_v2_sharded_weight_loader``), ``A_log``
      and ``dt_bias`` by heads (``sharded_weight_loader(0)``).
    """
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, Spec] = {}
    gdn: dict[str, Spec] = {}  # applied last: they override the generic spec of conv1d
    for mod_name, module in model.named_modules():
        kinds = {c.__name__ for c in type(module).__mro__}
        prefix = f"{mod_name}." if mod_name else ""
        rank, size = _layer_tp(module, tp_rank, tp_size)
        for pname, param in module.named_parameters(recurse=False):
            full = names.get(id(param))
            if full is None or full != prefix + pname:
                continue  # listed under another name (a tied head)
            spec = _param_spec(module, kinds, pname, param, rank, size)
            if spec is not None:
                out[full] = spec
        if {"conv1d", "key_dim", "value_dim", "num_v_heads"} <= set(dir(module)):
            gdn |= _gdn_specs(module, prefix, names, rank, size)
    return out | gdn


def _layer_tp(module: Any, tp_rank: int, tp_size: int) -> tuple[int, int]:
    rank, size = getattr(module, "tp_rank", tp_rank), getattr(module, "tp_size", tp_size)
    if isinstance(rank, int) and isinstance(size, int) and size >= 1:
        return rank, size
    return tp_rank, tp_size


def _param_spec(
    module: Any, kinds: set[str], pname: str, param: Any, rank: int, size: int
) -> Spec | None:
    out_dim, in_dim = getattr(param, "output_dim", None), getattr(param, "input_dim", None)
    if "FusedMoE" in kinds and pname in ("w13_weight", "w2_weight"):
        return _moe_spec(module, pname)
    if "RowParallelLinear" in kinds:
        return Spec("row", in_dim, tp_rank=rank, tp_size=size) if isinstance(in_dim, int) else None
    if "VocabParallelEmbedding" in kinds:
        if not isinstance(out_dim, int) or pname not in ("weight", "bias"):
            return None
        spec = Spec(
            "vocab",
            tp_rank=rank,
            tp_size=size,
            org=int(module.org_vocab_size),
            padded=int(module.num_embeddings_padded),
        )
        added = int(getattr(module, "num_added_embeddings", 0) or 0)
        return replace(spec, added=added) if added else spec
    if not isinstance(out_dim, int):
        return None
    if "QKVParallelLinear" in kinds:
        head = int(module.head_size)
        v_head = int(getattr(module, "v_head_size", head))
        kv, reps = int(module.total_num_kv_heads), int(module.num_kv_head_replicas)
        qkv = (int(module.total_num_heads) * head, kv * head, kv * v_head)
        return Spec("column", out_dim, qkv, (1, reps, reps), rank, size)
    if "MergedColumnParallelLinear" in kinds:
        sizes = tuple(int(x) for x in module.output_sizes)
        return Spec("column", out_dim, sizes, (1,) * len(sizes), rank, size)
    if "ColumnParallelLinear" in kinds:
        return Spec("column", out_dim, (int(module.output_size),), (1,), rank, size)
    return None


def _moe_spec(module: Any, pname: str) -> Spec:
    """FusedMoE.weight_loader: ``expert_map[global] = local`` (-1: not here), and
    the MoE layer's own tensor-parallel rank and size (1 under expert parallelism)."""
    rank, size = _layer_tp(getattr(module, "moe_parallel_config", module), 0, 1)
    local = int(getattr(module, "local_num_experts"))  # noqa: B009
    total = int(getattr(module, "global_num_experts", local))
    emap = getattr(module, "expert_map", None)
    if isinstance(emap, torch.Tensor):
        by_local = {int(loc): g for g, loc in enumerate(emap.tolist()) if int(loc) >= 0}
        ids = tuple(by_local[j] for j in range(local))
    else:
        ids = tuple(range(local))
    if pname == "w13_weight":  # _load_w13: gate in the first half, up in the second
        inter = int(module.intermediate_size_per_partition) * size
        inner = Spec("column", 1, (inter, inter), (1, 1), rank, size)
    else:  # _load_w2: the input dimension (2 of [E, H, I])
        inner = Spec("row", 2, tp_rank=rank, tp_size=size)
    return Spec("experts", experts=total, ids=ids, inner=inner)


def _gdn_specs(
    module: Any, prefix: str, names: dict[int, str], rank: int, size: int
) -> dict[str, Spec]:
    out: dict[str, Spec] = {}
    key, value, heads = int(module.key_dim), int(module.value_dim), int(module.num_v_heads)
    conv = getattr(getattr(module, "conv1d", None), "weight", None)
    if conv is not None and names.get(id(conv)) == prefix + "conv1d.weight":
        out[prefix + "conv1d.weight"] = Spec("column", 0, (key, key, value), (1, 1, 1), rank, size)
    for pname in ("A_log", "dt_bias"):
        p = getattr(module, pname, None)
        if p is not None and names.get(id(p)) == prefix + pname:
            out[prefix + pname] = Spec("column", 0, (heads,), (1,), rank, size)
    return out


def _local_model_dir(model: str, revision: Any) -> str | None:
    """The local directory of ``model``: itself, or its Hugging Face cache snapshot."""
    if os.path.isdir(model):
        return os.path.abspath(model)
    try:
        from huggingface_hub import snapshot_download  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None
    try:
        return str(
            snapshot_download(
                model,
                revision=revision if isinstance(revision, str) else None,
                local_files_only=True,
            )
        )
    except Exception:  # not in the cache: the user passes --model-dir
        return None


def _vllm_version() -> str | None:
    try:
        import vllm  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None
    return str(getattr(vllm, "__version__", "unknown"))


def _tp_rank(worker: Any, tp: Any) -> int:
    try:
        from vllm.distributed import (  # type: ignore[import-not-found, unused-ignore]
            get_tensor_model_parallel_rank,
        )

        return int(get_tensor_model_parallel_rank())
    except Exception:  # no vLLM, or its groups are not set up (a stand-in)
        rank = getattr(worker, "rank", 0)
        size = tp if isinstance(tp, int) and tp > 0 else 1
        return int(rank) % size if isinstance(rank, int) else 0


def _pp_rank(worker: Any, tp_size: int) -> int:
    try:
        from vllm.distributed import get_pp_group  # type: ignore[import-not-found, unused-ignore]

        return int(get_pp_group().rank_in_group)
    except Exception:  # no vLLM, or its groups are not set up (a stand-in)
        rank = getattr(worker, "rank", 0)
        return int(rank) // tp_size if isinstance(rank, int) else 0


def _repacked_moe(model: torch.nn.Module) -> Iterator[str]:
    """``"<module>: <setting>"`` for every fused-MoE module (one holding
    ``w13_weight`` or ``ws``) whose method is quantized or whose settings name a
    kernel that lays the expert weights out its own way."""
    for name, module in model.named_modules():
        if not (hasattr(module, "w13_weight") or hasattr(module, "ws")):
            continue
        method = getattr(module, "quant_method", None)
        if method is None:
            continue
        kind = type(method).__name__
        if kind != "UnquantizedFusedMoEMethod":
            yield f"{name}: {kind}"
            continue
        for attr, value in sorted(vars(method).items()):
            if _repacking(attr, value):
                yield f"{name}: {attr}={value}"


def _repacking(attr: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value and any(w in attr.lower() for w in _REPACKING_WORDS)
    if isinstance(value, enum.Enum | str):
        text = (value.name if isinstance(value, enum.Enum) else value).lower()
        return any(w in text for w in _REPACKING_WORDS)
    return False
