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
``pipeline_parallel_size``, ``dtype``, ``quantization``, ``lora_enabled``,
``expert_parallel``, ``moe_repacked`` (fused-MoE layers whose kernel settings
suggest reordered, shuffled or padded expert weights), and the GPU's UUID (added by
``export_handles``). Every attribute is read defensively: this module is written
against vLLM's documented worker interface (``self.model_runner.model``,
``self.vllm_config``, ``self.rank``) and imports nothing from vLLM at import time,
so it loads where vLLM is not installed.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from apollo_sync.dtypes import st_dtype
from apollo_sync.handles import default_handles_path, export_handles

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

        With tensor parallelism each rank writes its own file: ``.rank<N>`` is
        appended to the path of every rank but rank 0.
        """
        meta = worker_metadata(self)
        target = Path(path) if path else default_handles_path()
        rank = meta.get("tensor_parallel_rank", 0)
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
    meta["tensor_parallel_rank"] = _tp_rank(worker, tp)
    pp = getattr(parallel, "pipeline_parallel_size", None)
    if isinstance(pp, int):
        meta["pipeline_parallel_size"] = pp
    dtype = getattr(model_cfg, "dtype", None)
    if isinstance(dtype, torch.dtype):
        meta["dtype"] = st_dtype(dtype)
    quant = getattr(model_cfg, "quantization", None)
    meta["quantization"] = None if quant is None else str(quant)
    meta["lora_enabled"] = getattr(cfg, "lora_config", None) is not None
    meta["expert_parallel"] = bool(getattr(parallel, "enable_expert_parallel", False)) or bool(
        getattr(parallel, "enable_eplb", False)
    )
    model_obj = getattr(getattr(worker, "model_runner", None), "model", None)
    if isinstance(model_obj, torch.nn.Module):
        meta["moe_repacked"] = list(_repacked_moe(model_obj))
    return meta


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
