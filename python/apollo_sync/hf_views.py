"""The layout mapping the other way: HF-named tensors that are views into vLLM's.

A training worker that shares the serving process's GPU memory builds its
transformers model directly on the live vLLM tensors, so that an optimizer step
changes what vLLM serves, and a sync writes it to the files. :func:`hf_views`
gives it the tensors to build on, named as in the checkpoint: row slices of
merged parameters (``qkv_proj`` -> ``q_proj``, ``k_proj``, ``v_proj``), per-expert
slices of fused experts, the checkpoint's rows of a padded vocabulary. It uses the
same tables as the sync (:mod:`apollo_sync.layouts`), so what a worker trains is
exactly what a sync writes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Literal

import torch

from apollo_sync.dtypes import torch_dtype
from apollo_sync.errors import LayoutError, RefusedError
from apollo_sync.layouts import EXPERT_RULES, Match, map_tensors, tied_embeddings
from apollo_sync.live import LiveTensor, from_torch
from apollo_sync.model_dir import ModelDir


class HFViews(dict[str, torch.Tensor]):
    """HF name -> a view into a live tensor (writes to it change the live tensor).

    ``dtype_differs`` names the tensors whose checkpoint dtype differs from the
    live one (a float32 checkpoint tensor held in bf16): a view in the file's
    dtype is impossible, so the view has the live dtype, and a sync writes it
    back upcast (see :mod:`apollo_sync.upcast`). Its value is ``(live, file)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dtype_differs: dict[str, tuple[str, str]] = {}


def hf_views(
    live_tensors: Mapping[str, torch.Tensor | LiveTensor],
    model_dir: str | os.PathLike[str],
    *,
    experts: Literal["checkpoint", "fused"] = "checkpoint",
) -> HFViews:
    """HF-named views into ``live_tensors`` (vLLM names and layouts), one per
    tensor of ``model_dir`` that a live tensor maps onto (see the module docs).

    ``experts="checkpoint"`` names fused MoE experts as the checkpoint does (per
    expert, ``experts.N.gate_proj.weight`` ..., or fused where it stores them
    fused); ``experts="fused"`` gives transformers' in-memory 3-D parameters
    instead (``experts.gate_up_proj`` ``[E, 2I, H]``, ``experts.down_proj``),
    which are the whole vLLM tensors: transformers 5 holds experts fused and
    saves them per expert.

    ``live_tensors`` may also hold :class:`LiveTensor` objects opened from a
    handles file (``load_handles(...).tensors``) whose memory is CUDA memory, as
    in a training worker that shares the serving process's GPU.

    Raises :class:`LayoutError` (or :class:`RefusedError`) when a live tensor maps
    onto nothing or cannot be written back, and :class:`LayoutError` for a
    non-contiguous live tensor (a view into it cannot be a flat byte range) or a
    host live tensor from a handles file (mapped read-only: nothing to train).
    """
    bases: dict[str, torch.Tensor] = {}
    live: dict[str, LiveTensor] = {}
    for name, t in live_tensors.items():
        if isinstance(t, LiveTensor):
            if not isinstance(t.source, torch.Tensor):
                raise LayoutError(
                    f"{name}: host memory from a handles file is mapped read-only; "
                    "views to train on need the tensor itself or CUDA handles"
                )
            bases[name] = t.source[t.offset : t.offset + t.nbytes]
            live[name] = replace(t, source=bases[name], offset=0)
            continue
        if not t.is_contiguous():
            raise LayoutError(f"{name}: not contiguous; a view into it cannot be built")
        live[name] = from_torch(name, t)
        bases[name] = t.detach().reshape(-1).view(torch.uint8)
    md = ModelDir.open(model_dir)
    mapping = map_tensors(live, md.tensors, tied=tied_embeddings(md.path))
    if mapping.problems:
        refused = any(p.kind == "refused" for p in mapping.problems)
        lines = "\n".join(f"  {p.live_name}: {p.detail}" for p in mapping.problems[:20])
        raise (RefusedError if refused else LayoutError)(
            f"{len(mapping.problems)} live tensor(s) do not map onto {md.path}:\n{lines}"
        )
    out = HFViews()
    fused_done: set[str] = set()
    for m in mapping.matches:
        base = bases[m.live_name]
        if experts == "fused" and "split experts." in m.rule:
            name = _fused_expert_name(m)
            if name not in fused_done:
                fused_done.add(name)
                whole = live[m.live_name]
                out[name] = base.view(torch_dtype(whole.dtype)).view(whole.shape)
            continue
        view = base[m.live.offset : m.live.offset + m.live.nbytes]
        out[m.disk.name] = view.view(torch_dtype(m.live.dtype)).view(m.live.shape)
        if m.kind == "upcast":
            out.dtype_differs[m.disk.name] = (m.live.dtype, m.disk.dtype)
    return out


def _fused_expert_name(m: Match) -> str:
    """transformers' fused parameter name for a per-expert match."""
    fused = m.live_name.rsplit(".", 1)[-1]
    hf = next(r.hf_fused for r in EXPERT_RULES if r.fused == fused)
    base = m.disk.name[: m.disk.name.rindex(".experts.") + len(".experts.")]
    return base + hf
