"""What the producer's metadata says cannot be written back byte for byte.

The vLLM worker extension (:mod:`apollo_sync.vllm_ext`) records how the model is
served. Some settings change the live weights so that they are no longer the
checkpoint's bytes, or spread them over processes; a sync refuses them before
anything is written, with the reason. Name- and shape-based refusals (scales,
packed integers, LoRA wrappers, expert counts) are in :mod:`apollo_sync.layouts`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from apollo_sync.errors import RefusedError


def producer_refusals(metadata: Mapping[str, Any]) -> list[str]:
    """Every reason the metadata gives to refuse a byte-exact sync (empty: none)."""
    out: list[str] = []
    whole = isinstance(metadata.get("rank_set"), int)  # every rank, put together (ranks.py)
    tp = metadata.get("tensor_parallel_size", 1)
    pp = metadata.get("pipeline_parallel_size", 1)
    if not whole and ((isinstance(tp, int) and tp > 1) or (isinstance(pp, int) and pp > 1)):
        out.append(
            f"tensor parallelism (size {tp}) / pipeline parallelism (size {pp}): these "
            "handles are one rank's slice of the model; pass rank 0's handles file (the "
            "others are found beside it as .rank<N>) or every rank's, to sync them as one set"
        )
    quant = metadata.get("quantization")
    if quant not in (None, "", "none", "None"):
        out.append(
            f"quantization {quant!r}: quantized or repacked weights (rescaled fp8 scales, "
            "GPTQ/AWQ/Marlin packing) are not the checkpoint's bytes"
        )
    if metadata.get("lora_enabled"):
        out.append("LoRA is enabled: the served layers are wrapped; serve without --enable-lora")
    if metadata.get("eplb"):
        out.append(
            "EPLB (expert-parallel load balancing): redundant expert replicas are moved "
            "between ranks at run time; serve without --enable-eplb to sync"
        )
    if metadata.get("expert_parallel") and not whole:
        out.append(
            "expert parallelism: each rank holds a subset of the experts; pass every "
            "rank's handles to sync them as one set"
        )
    repacked = metadata.get("moe_repacked")
    if isinstance(repacked, list | tuple) and repacked:
        shown = ", ".join(str(x) for x in repacked[:3])
        more = f" and {len(repacked) - 3} more" if len(repacked) > 3 else ""
        out.append(
            f"MoE layers whose kernel reorders, shuffles or pads the expert weights: {shown}{more}"
        )
    return out


def check_producer(metadata: Mapping[str, Any], source: str = "the producer") -> None:
    """Raises :class:`RefusedError` listing every reason from :func:`producer_refusals`."""
    reasons = producer_refusals(metadata)
    if reasons:
        raise RefusedError(
            f"{source}: the live weights cannot be written back byte for byte "
            "(nothing was written):\n" + "\n".join(f"  {r}" for r in reasons)
        )
