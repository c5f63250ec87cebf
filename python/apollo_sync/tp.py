"""Tensor-, pipeline- and expert-parallel ranks put back together, without a gather.

Each rank of a vLLM model served on several GPUs holds a piece of every sharded
parameter. The worker extension (:mod:`apollo_sync.vllm_ext`) records, per rank,
how vLLM's own layer objects partitioned each parameter (:data:`PARTITIONS_KEY`
in the handles metadata, one :class:`Spec` per parameter). From those, this
module describes every parameter as the *full* tensor vLLM would hold at
tensor-parallel size 1 (the layout :mod:`apollo_sync.layouts` maps onto the
files), made of pieces of the ranks' tensors along one dimension:

* ``column`` (``ColumnParallelLinear``, ``MergedColumnParallelLinear``,
  ``QKVParallelLinear``, the GDN ``conv1d`` of ``mamba_v2_sharded_weight_loader``,
  ``A_log``/``dt_bias`` of ``sharded_weight_loader(0)``): the output dimension is
  a concatenation of sections (``output_sizes``: q, k, v; gate, up; q, k, v, z);
  each rank holds shard ``tp_rank // replicas`` of every section, one after the
  other. ``QKVParallelLinear.weight_loader`` gives K and V ``num_kv_head_replicas``
  > 1 when the tensor-parallel size exceeds the KV heads: several ranks then hold
  the same rows, which are written once and checked to agree.
* ``row`` (``RowParallelLinear.weight_loader``, the MoE ``w2`` of
  ``FusedMoE._load_w2``): rank ``r`` holds columns ``[r*n, (r+1)*n)`` of the input
  dimension, so every row of the file is a strip from each rank.
* ``vocab`` (``VocabParallelEmbedding.weight_loader``, ``ParallelLMHead``): rank
  ``r`` holds rows ``[r*P, (r+1)*P)`` of the vocabulary padded by
  ``pad_vocab_size``; rows past the checkpoint's vocabulary are padding, dropped
  here and checked to be zero.
* ``experts`` (``FusedMoE.weight_loader``): ``w13`` / ``w2`` hold the layer's
  local experts; with expert parallelism the ``expert_map`` says which global
  expert each local slot is, so whole experts come from each rank; without it,
  every rank holds every expert and the inner spec (``column`` for ``w13``'s
  gate and up halves per ``FusedMoE._load_w13``, ``row`` for ``w2``) applies.
* no spec: the parameter is replicated (norms, routers, ``ReplicatedLinear``):
  taken from one rank and checked equal on the others.

A full tensor is a :class:`LiveTensor` whose source is a :class:`ShardedSource`:
asking it for a byte range assembles that range from the ranks (strided copies
straight into their places), so the existing layout rules (merged splits,
per-expert splits, vocabulary padding, tied heads) apply unchanged and the bytes
are only read when they are streamed, in bounded chunks. One 4 KiB block of a
row-parallel file tensor holds strips of several ranks: it is complete only
once every rank's strip is in place, which is how the chunk is built before it
is compared.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apollo_sync._core import Syncer
from apollo_sync.dtypes import itemsize
from apollo_sync.errors import HandlesError, RefusedError
from apollo_sync.live import HostBytes, LiveTensor
from apollo_sync.stream import CHUNK_BYTES as CHUNK_BYTES_ONE_GPU
from apollo_sync.stream import (
    INTERLEAVE_BYTES,
    STAGING_DEPTH,
    Placement,
    StreamStats,
    interleave,
    staging_ring,
    width,
)

#: Metadata key under which the worker extension records each parameter's
#: partition (a JSON object ``{name: spec}``; parameters absent are replicated).
PARTITIONS_KEY = "partitions"


@dataclass(frozen=True)
class Spec:
    """How one rank holds one parameter (see the module docs for the rules).

    ``dim``: the split dimension. ``sizes`` / ``replicas``: the full sections
    along it and how many ranks hold each shard of them (``column``).
    ``tp_rank`` / ``tp_size``: the layer's own (an MoE layer under expert
    parallelism has size 1; a layer with ``disable_tp`` too). ``org`` /
    ``padded``: the vocabulary and its padded size (``vocab``). ``experts`` /
    ``ids``: the global expert count and the global id of each local slot; ``inner``
    the spec of one rank's experts along the other dimensions (``experts``).
    """

    rule: str
    dim: int = 0
    sizes: tuple[int, ...] = ()
    replicas: tuple[int, ...] = ()
    tp_rank: int = 0
    tp_size: int = 1
    org: int = 0
    padded: int = 0
    experts: int = 0
    ids: tuple[int, ...] = ()
    inner: Spec | None = None
    #: vocabulary rows added past the checkpoint's (LoRA): refused when read
    added: int = 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rule": self.rule,
            "dim": self.dim,
            "tp": [self.tp_rank, self.tp_size],
        }
        if self.rule == "column":
            out |= {"sizes": list(self.sizes), "replicas": list(self.replicas)}
        elif self.rule == "vocab":
            out |= {"org": self.org, "padded": self.padded}
            if self.added:
                out["added"] = self.added
        elif self.rule == "experts":
            out |= {"experts": self.experts, "ids": list(self.ids)}
            if self.inner is not None:
                out["inner"] = self.inner.to_json()
        return out


RULES = ("replicated", "column", "row", "vocab", "experts")


def parse_spec(obj: Any, where: str) -> Spec:
    """A :class:`Spec` from its JSON form; :class:`HandlesError` naming ``where`` if malformed."""

    def ints(v: Any, what: str) -> tuple[int, ...]:
        if not isinstance(v, list) or not all(isinstance(x, int) and x >= 0 for x in v):
            raise HandlesError(f"{where}: partition {what} is not a list of integers")
        return tuple(v)

    if not isinstance(obj, dict) or obj.get("rule") not in RULES:
        raise HandlesError(f"{where}: malformed partition record {obj!r}")
    tp = ints(obj.get("tp", [0, 1]), "tp")
    dim = obj.get("dim", 0)
    if len(tp) != 2 or tp[1] < 1 or tp[0] >= tp[1] or not isinstance(dim, int) or dim < 0:
        raise HandlesError(f"{where}: malformed partition record {obj!r}")
    spec = Spec(str(obj["rule"]), dim=dim, tp_rank=tp[0], tp_size=tp[1])
    if spec.rule == "column":
        sizes, replicas = ints(obj.get("sizes"), "sizes"), ints(obj.get("replicas"), "replicas")
        if not sizes or len(sizes) != len(replicas) or 0 in replicas:
            raise HandlesError(f"{where}: malformed column partition {obj!r}")
        return Spec("column", dim, sizes, replicas, tp[0], tp[1])
    if spec.rule == "vocab":
        org, padded = obj.get("org"), obj.get("padded")
        if not isinstance(org, int) or not isinstance(padded, int) or not 0 < org <= padded:
            raise HandlesError(f"{where}: malformed vocab partition {obj!r}")
        if obj.get("added", 0):
            raise RefusedError(
                f"{where}: {obj['added']} vocabulary rows added past the checkpoint's (LoRA "
                "extra vocabulary) are sharded apart from the base rows; not synced"
            )
        return Spec("vocab", 0, tp_rank=tp[0], tp_size=tp[1], org=org, padded=padded)
    if spec.rule == "experts":
        experts, ids = obj.get("experts"), ints(obj.get("ids"), "ids")
        if not isinstance(experts, int) or any(i >= experts for i in ids):
            raise HandlesError(f"{where}: malformed experts partition {obj!r}")
        inner = parse_spec(obj["inner"], where) if "inner" in obj else None
        return Spec("experts", 0, experts=experts, ids=ids, inner=inner)
    return spec


def parse_partitions(meta: Mapping[str, Any], where: str) -> dict[str, Spec]:
    """Every parameter's :class:`Spec` recorded in one rank's metadata."""
    raw = meta.get(PARTITIONS_KEY)
    if not isinstance(raw, str):
        raise HandlesError(
            f"{where}: no partition metadata ({PARTITIONS_KEY!r}): exported by an older "
            "apollo_sync worker extension; re-export with this one"
        )
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise HandlesError(f"{where}: partition metadata is not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise HandlesError(f"{where}: partition metadata is not an object")
    return {str(k): parse_spec(v, f"{where}: {k}") for k, v in obj.items()}


@dataclass(frozen=True)
class Piece:
    """Positions ``[start, start+length)`` of the full tensor's split dimension are
    positions ``[local, local+length)`` of rank ``rank``'s tensor."""

    rank: int
    start: int
    local: int
    length: int


@dataclass(frozen=True)
class RankLayout:
    """One rank's share of one parameter: the full shape, the split dimension, the
    pieces it holds, and local ranges along the dimension that must be zero."""

    full: tuple[int, ...]
    dim: int
    pieces: tuple[tuple[int, int, int], ...]  # (start, local, length)
    zeros: tuple[tuple[int, int], ...] = ()  # (local, length)


def rank_layout(name: str, spec: Spec, local: tuple[int, ...]) -> RankLayout:
    """Where one rank's tensor of shape ``local`` lies in the full tensor (the rules
    of the module docs); :class:`HandlesError` when the shape contradicts the spec."""
    if spec.rule != "replicated" and spec.dim >= max(1, len(local)):
        raise HandlesError(f"{name}: split dimension {spec.dim} of a {len(local)}-d tensor")
    if spec.rule == "replicated" or (spec.rule in ("column", "row") and spec.tp_size == 1):
        if spec.rule == "column" and local and local[spec.dim] != sum(spec.sizes):
            raise HandlesError(
                f"{name}: holds {local[spec.dim]} along dimension {spec.dim}, "
                f"its layer {sum(spec.sizes)} (sections {list(spec.sizes)})"
            )
        n = local[0] if local else 1
        return RankLayout(local, 0, ((0, 0, n),))
    d = spec.dim
    if spec.rule == "column":
        # MergedColumnParallelLinear / QKVParallelLinear.weight_loader: section s is
        # cut into tp_size // replicas[s] shards; this rank holds shard
        # tp_rank // replicas[s] of each, the sections one after the other.
        cols: list[tuple[int, int, int]] = []
        start, pos = 0, 0
        for full, rep in zip(spec.sizes, spec.replicas, strict=True):
            shards = spec.tp_size // rep
            if shards * rep != spec.tp_size or full % shards:
                raise HandlesError(
                    f"{name}: section of {full} with {rep} replica(s) does not divide "
                    f"over tensor-parallel size {spec.tp_size}"
                )
            n = full // shards
            cols.append((start + (spec.tp_rank // rep) * n, pos, n))
            start, pos = start + full, pos + n
        if local[d] != pos:
            raise HandlesError(
                f"{name}: holds {local[d]} along dimension {d}, its partition says {pos} "
                f"(sections {list(spec.sizes)}, tensor-parallel {spec.tp_rank}/{spec.tp_size})"
            )
        return RankLayout(_with(local, d, start), d, tuple(cols))
    if spec.rule == "row":
        # RowParallelLinear.weight_loader: input dimension narrowed at tp_rank * n.
        n = local[d]
        return RankLayout(_with(local, d, n * spec.tp_size), d, ((spec.tp_rank * n, 0, n),))
    if spec.rule == "vocab":
        # VocabParallelEmbedding: rows [r*P, (r+1)*P) of the padded vocabulary
        # (vocab_range_from_global_vocab_size); the loader zero-fills past the end.
        per = spec.padded // spec.tp_size
        if per * spec.tp_size != spec.padded or local[0] != per:
            raise HandlesError(
                f"{name}: holds {local[0]} vocabulary rows; padded vocabulary {spec.padded} "
                f"over tensor-parallel size {spec.tp_size} gives {spec.padded / spec.tp_size:g}"
            )
        start = spec.tp_rank * per
        n = max(0, min(per, spec.org - start))
        pieces = ((start, 0, n),) if n else ()
        zeros = ((n, per - n),) if per > n else ()
        return RankLayout(_with(local, 0, spec.org), 0, pieces, zeros)
    # experts (FusedMoE.weight_loader): local slot j holds global expert ids[j]
    if len(local) < 2 or len(spec.ids) != local[0]:
        raise HandlesError(
            f"{name}: {local[0] if local else 0} local experts, the expert map lists "
            f"{len(spec.ids)}"
        )
    inner = spec.inner or Spec("replicated")
    every = spec.ids == tuple(range(spec.experts))
    if every:
        if inner.rule == "replicated" or inner.tp_size == 1:
            return RankLayout(local, 0, ((0, 0, local[0]),))
        return rank_layout(name, inner, local)
    if inner.rule != "replicated" and inner.tp_size > 1:
        raise RefusedError(
            f"{name}: experts split over ranks and tensor-parallel within them at once; "
            "not a layout vLLM builds (its expert parallelism has MoE tensor-parallel size 1)"
        )
    pieces_list: list[tuple[int, int, int]] = []
    for j, g in enumerate(spec.ids):
        if pieces_list and pieces_list[-1][0] + pieces_list[-1][2] == g:
            s, l0, n = pieces_list[-1]
            pieces_list[-1] = (s, l0, n + 1)
        else:
            pieces_list.append((g, j, 1))
    return RankLayout(_with(local, 0, spec.experts), 0, tuple(pieces_list))


def _with(shape: tuple[int, ...], dim: int, n: int) -> tuple[int, ...]:
    return (*shape[:dim], n, *shape[dim + 1 :])


class ShardedSource:
    """The bytes of a full tensor, held in pieces by several ranks.

    ``source[a:b]`` assembles bytes ``a:b`` of the full tensor (row-major) into a
    new host array: each writer piece is copied straight into its place (a 2-D
    strided copy for the rows a range covers whole), each replica piece is
    compared with its writer's bytes.
    """

    def __init__(
        self,
        name: str,
        dtype: str,
        full: tuple[int, ...],
        dim: int,
        ranks: Mapping[int, LiveTensor],
        writers: Sequence[Piece],
        replicas: Sequence[Piece],
    ) -> None:
        self.name, self.dtype, self.full, self.dim = name, dtype, full, dim
        self.ranks = dict(ranks)
        self.writers, self.replicas = list(writers), list(replicas)
        w = itemsize(dtype)
        self.unit = prod(full[dim + 1 :]) * w  # bytes of one index along dim
        self.row = (full[dim] if full else 1) * self.unit  # bytes of one outer row
        self.nbytes = prod(full) * w
        self.local_row = {
            r: (t.shape[dim] if t.shape else 1) * self.unit for r, t in self.ranks.items()
        }

    def __getitem__(self, key: slice) -> HostBytes:
        a, b, step = key.indices(self.nbytes)
        if step != 1:
            raise IndexError("only contiguous byte ranges")
        out = np.empty(max(0, b - a), dtype=np.uint8)
        if b > a:
            self.assemble_into(a, b, out)
            self.check_replicas(a, b, out)
        return out

    def devices(self) -> set[torch.device]:
        """The CUDA devices of the ranks that write this tensor."""
        return {
            self.ranks[p.rank].device_bytes(0, 0).device
            for p in self.writers
            if self.ranks[p.rank].is_cuda
        }

    def assemble_into(
        self,
        a: int,
        b: int,
        out: HostBytes,
        streams: Mapping[torch.device, torch.cuda.Stream] | None = None,
    ) -> None:
        """Bytes ``a:b`` of the full tensor into ``out``. With ``streams`` (one per
        device), the CUDA ranks' pieces are strided device-to-host copies issued
        on their device's stream, not waited for (``out`` should be pinned); host
        ranks' pieces are copied at once."""
        for p in self.writers:
            self._copy(p, a, b, out, check=False, streams=streams)

    def check_replicas(self, a: int, b: int, out: HostBytes) -> None:
        """Raises :class:`RefusedError` when a rank holding a replica of bytes
        ``a:b`` (K/V heads, a replicated parameter) holds other bytes than the
        assembled ``out`` (complete: any copies into it have finished)."""
        for p in self.replicas:
            self._copy(p, a, b, out, check=True)

    def _copy(
        self,
        p: Piece,
        a: int,
        b: int,
        out: HostBytes,
        *,
        check: bool,
        streams: Mapping[torch.device, torch.cuda.Stream] | None = None,
    ) -> None:
        """Copies (or, ``check``, compares) piece ``p``'s share of bytes ``a:b``."""
        row, lrow, u = self.row, self.local_row[p.rank], self.unit
        ps, pe = p.start * u, (p.start + p.length) * u  # within a full row
        ls = p.local * u  # within a local row
        o0, o1 = a // row, (b - 1) // row + 1
        # rows covered whole: one strided copy; the (at most two) others by parts
        m0 = o0 if a == o0 * row else o0 + 1
        m1 = o1 if b >= o1 * row else o1 - 1
        m1 = max(m1, m0)
        if m1 > m0 and pe > ps:
            dst = out[m0 * row - a : m1 * row - a].reshape(m1 - m0, row)[:, ps:pe]
            self._strided(p, m0, m1, ls, pe - ps, lrow, dst, check, streams)
        for o in sorted({o0, o1 - 1}):
            if m0 <= o < m1:
                continue
            lo, hi = max(a, o * row + ps), min(b, o * row + pe)
            if hi <= lo:
                continue
            src_at = o * lrow + ls + (lo - o * row - ps)
            dst = out[lo - a : hi - a].reshape(1, hi - lo)
            self._strided(p, 0, 1, src_at, hi - lo, 0, dst, check, streams)

    def _strided(
        self,
        p: Piece,
        r0: int,
        r1: int,
        col: int,
        width: int,
        pitch: int,
        dst: np.ndarray[tuple[int, int], np.dtype[np.uint8]],
        check: bool,
        streams: Mapping[torch.device, torch.cuda.Stream] | None = None,
    ) -> None:
        """Rows ``r0:r1`` of rank ``p.rank``'s bytes seen as rows of ``pitch`` bytes,
        columns ``col:col+width``, into (or compared with) ``dst``."""
        t = self.ranks[p.rank]
        start = r0 * pitch + col
        stop = (r1 - 1) * pitch + col + width
        if t.is_cuda and streams is not None and not check:
            src = t.device_bytes(start, stop)
            _copy_2d(dst, src, pitch, r1 - r0, width, streams[src.device])
            return
        if t.is_cuda:
            src_dev = t.device_bytes(start, stop)
            if r1 - r0 > 1:
                src_dev = torch.as_strided(src_dev, (r1 - r0, width), (pitch, 1))
            else:
                src_dev = src_dev.reshape(1, width)
            got = src_dev.cpu().numpy()
        else:
            flat = t.host_bytes(start, stop)
            got = np.lib.stride_tricks.as_strided(
                flat, shape=(r1 - r0, width), strides=(pitch, 1), writeable=False
            )
        if check:
            if not np.array_equal(dst, got):
                raise RefusedError(
                    f"{self.name}: rank {p.rank} holds a replica of positions "
                    f"{p.start}..{p.start + p.length} of dimension {self.dim} that differs from "
                    "the rank that writes them: the replicas diverged (did training update "
                    "only some ranks?); nothing was written"
                )
        else:
            dst[...] = got


def assemble(
    ranks: Sequence[tuple[Mapping[str, LiveTensor], Mapping[str, Spec]]],
) -> dict[str, LiveTensor]:
    """The full tensors of a set of ranks: ``ranks[i]`` is rank ``i``'s live tensors
    and partition specs. Every position of every full tensor must be held by some
    rank; positions held by several (KV-head replicas, replicated parameters, a
    parameter on several pipeline stages) must be held identically. Padding rows
    of a vocabulary are checked to be zero here."""
    holders: dict[str, list[tuple[int, LiveTensor, Spec]]] = {}
    for i, (tensors, specs) in enumerate(ranks):
        for name, t in tensors.items():
            holders.setdefault(name, []).append((i, t, specs.get(name, Spec("replicated"))))
    out: dict[str, LiveTensor] = {}
    for name, held in holders.items():
        out[name] = _full_tensor(name, held)
    return out


def _full_tensor(name: str, held: list[tuple[int, LiveTensor, Spec]]) -> LiveTensor:
    dtypes = {t.dtype for _, t, _ in held}
    if len(dtypes) != 1:
        raise HandlesError(f"{name}: ranks hold it in different dtypes {sorted(dtypes)}")
    dtype = held[0][1].dtype
    layouts = [(i, t, rank_layout(f"{name} (rank {i})", s, t.shape)) for i, t, s in held]
    full, dim = layouts[0][2].full, layouts[0][2].dim
    for i, _, lay in layouts:
        if lay.full != full or lay.dim != dim:
            raise HandlesError(
                f"{name}: rank {i} describes the full tensor as {list(lay.full)} split on "
                f"dimension {lay.dim}, rank {layouts[0][0]} as {list(full)} on {dim}"
            )
    for i, t, lay in layouts:
        for local, n in lay.zeros:
            _check_zero(name, i, t, lay.dim, local, n)
    writers: list[Piece] = []
    replicas: list[Piece] = []
    by_start: dict[int, Piece] = {}
    for i, _, lay in layouts:
        for start, local, n in lay.pieces:
            p = Piece(i, start, local, n)
            first = by_start.get(start)
            if first is None:
                by_start[start] = p
                writers.append(p)
            elif first.length == n:
                replicas.append(p)
            else:
                raise HandlesError(
                    f"{name}: ranks {first.rank} and {i} hold overlapping but different "
                    f"ranges of dimension {dim} ({first.start}+{first.length}, {start}+{n})"
                )
    writers.sort(key=lambda p: p.start)
    pos = 0
    for p in writers:
        if p.start != pos:
            what = "held by no rank" if p.start > pos else "held twice, differently"
            raise HandlesError(
                f"{name}: positions {min(pos, p.start)}..{max(pos, p.start)} of dimension "
                f"{dim} are {what} (an incomplete set of ranks?)"
            )
        pos = p.start + p.length
    size = full[dim] if full else 1
    if pos != size:
        raise HandlesError(
            f"{name}: positions {pos}..{size} of dimension {dim} are held by no rank "
            "(an incomplete set of ranks?)"
        )
    source = ShardedSource(name, dtype, full, dim, {i: t for i, t, _ in layouts}, writers, replicas)
    return LiveTensor(name, dtype, full, source)


def _check_zero(name: str, rank: int, t: LiveTensor, dim: int, local: int, n: int) -> None:
    """Rows ``local:local+n`` (dimension 0) of a rank's vocabulary must be zero."""
    row = prod(t.shape[1:]) * itemsize(t.dtype)
    if t.is_cuda:
        nonzero = bool(t.device_bytes(local * row, (local + n) * row).any())
    else:
        nonzero = bool(t.host_bytes(local * row, (local + n) * row).any())
    if nonzero:
        raise RefusedError(
            f"{name}: rank {rank}'s vocabulary padding rows {local}..{local + n} are not zero "
            "(vLLM's loader fills them with zeros): not the layout this sync understands"
        )


#: Bytes of one staging buffer (one call into the core), as for a single GPU.
CHUNK_BYTES = CHUNK_BYTES_ONE_GPU

_CUDART: Any = None
_DEVICE_TO_HOST = 2  # cudaMemcpyDeviceToHost


def _cudart() -> Any:
    """The CUDA runtime torch loaded (for ``cudaMemcpy2DAsync``, which torch does
    not expose), or False where it cannot be found."""
    global _CUDART
    if _CUDART is None:
        _CUDART = False
        libs = ["libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so"]
        roots = [Path(torch.__file__).parent / "lib"]
        with contextlib.suppress(ImportError):
            import nvidia  # type: ignore[import-untyped, import-not-found, unused-ignore]

            roots += [Path(p) / "cuda_runtime" / "lib" for p in nvidia.__path__]
        for name in [*libs, *(str(r / n) for r in roots for n in libs)]:
            try:
                lib = ctypes.CDLL(name)
            except OSError:
                continue
            fn = lib.cudaMemcpy2DAsync
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t]
            fn.argtypes += [ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
            _CUDART = fn
            break
    return _CUDART


def _copy_2d(
    dst: np.ndarray[tuple[int, int], np.dtype[np.uint8]],
    src: torch.Tensor,
    pitch: int,
    rows: int,
    width: int,
    stream: torch.cuda.Stream,
) -> None:
    """``rows`` rows of ``width`` bytes, ``pitch`` apart from ``src`` (a 1-D CUDA
    view starting at the first), into ``dst`` (rows of a host array): one
    ``cudaMemcpy2DAsync`` on ``stream``, not waited for; a copy through torch
    (synchronous) where the runtime is not found."""
    fn = _cudart()
    dpitch = int(dst.strides[0]) if rows > 1 else width
    if fn:
        with torch.cuda.device(src.device):
            err = fn(
                dst.ctypes.data,
                dpitch,
                src.data_ptr(),
                pitch if rows > 1 else width,
                width,
                rows,
                _DEVICE_TO_HOST,
                stream.cuda_stream,
            )
        if err != 0:
            raise RuntimeError(f"cudaMemcpy2DAsync failed (error {err})")
        return
    view = torch.as_strided(src, (rows, width), (pitch if rows > 1 else width, 1))
    with torch.cuda.stream(stream):
        dst[...] = view.cpu().numpy()


@dataclass(frozen=True)
class _Part:
    shard: int
    offset: int  # in the file
    live: LiveTensor
    start: int  # bytes of the live tensor
    stop: int


def _parts(plan: Sequence[Placement], chunk: int) -> Iterator[list[_Part]]:
    """The plan cut into chunks of at most ``chunk`` bytes, in plan order."""
    out: list[_Part] = []
    total = 0
    for p in plan:
        pos, n = 0, p.live.nbytes
        while pos < n:
            if total >= chunk:
                yield out
                out, total = [], 0
            take = min(n - pos, chunk - total)
            out.append(_Part(p.shard, p.offset + pos, p.live, pos, pos + take))
            total += take
            pos += take
    if out:
        yield out


def is_sharded(t: LiveTensor) -> bool:
    return isinstance(t.source, ShardedSource)


def on_gpu(t: LiveTensor) -> bool:
    """Whether any of ``t``'s bytes are CUDA memory (its own, or a rank's)."""
    return t.is_cuda or (is_sharded(t) and bool(_source(t).devices()))


def stream_ranks(
    syncer: Syncer,
    plan: Sequence[Placement],
    *,
    progress: Callable[[int], None] | None = None,
    parallel_shards: bool = False,
    chunk_bytes: int | None = None,
    depth: int = STAGING_DEPTH,
) -> StreamStats:
    """:func:`apollo_sync.stream.stream_into` for the tensors of a set of ranks.

    Each chunk of the plan (in file order) is assembled in one buffer of a ring
    of ``depth`` staging buffers (pinned where a rank is on a GPU): every rank's
    pieces are copied straight into their places, the GPUs' strided copies
    issued on one stream per device, so all GPUs copy at once. A feeder thread
    waits for a buffer's copies, checks its replicas and hands it to the core
    (GIL released) while this thread fills the next buffer. Host memory stays
    bounded by the ring.
    """
    stats = StreamStats()
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    if parallel_shards:
        plan = interleave(plan, INTERLEAVE_BYTES)
    t0 = time.perf_counter()
    devices = sorted(
        {d for p in plan if is_sharded(p.live) for d in _source(p.live).devices()}, key=str
    )
    streams = {d: torch.cuda.Stream(device=d) for d in devices}
    for d, st in streams.items():
        st.wait_stream(torch.cuda.current_stream(d))
    buffers = [
        torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=bool(devices)).numpy()
        for _ in range(depth)
    ]
    stats.setup_s = time.perf_counter() - t0

    def submit(slot: int, parts: list[_Part]) -> _Staged:
        return _stage(parts, buffers[slot], streams)

    def consume(staged: _Staged) -> None:
        n, segments, checks, events = staged
        t0 = time.perf_counter()
        for ev in events:
            ev.synchronize()
        for source, a, b, view in checks:
            source.check_replicas(a, b, view)
        t1 = time.perf_counter()
        syncer.feed(segments)  # GIL released
        stats.copy_wait_s += t1 - t0
        stats.feed_s += time.perf_counter() - t1
        stats.batches += 1
        stats.bytes += n
        if progress:
            progress(n)

    staging_ring(
        depth, _parts(plan, chunk_bytes), submit, consume, stats, name="apollo-sync-ranks-feed"
    )
    return stats


_Check = tuple["ShardedSource", int, int, HostBytes]
_Staged = tuple[int, list[tuple[int, int, Any, int]], list[_Check], list[Any]]


def _source(t: LiveTensor) -> ShardedSource:
    assert isinstance(t.source, ShardedSource)
    return t.source


def _stage(
    parts: list[_Part], buf: HostBytes, streams: Mapping[torch.device, torch.cuda.Stream]
) -> _Staged:
    """Starts assembling ``parts`` into ``buf``; returns the byte count, the
    segments to feed, the replica checks to run and the events to wait for."""
    segments: list[tuple[int, int, Any, int]] = []
    checks: list[_Check] = []
    pos = 0
    for p in parts:
        n = p.stop - p.start
        if not is_sharded(p.live):  # host bytes (an upcast tensor): fed in place
            segments.append(
                (p.shard, p.offset, p.live.stream_source(p.start, p.stop), width(p.live))
            )
            continue
        source = _source(p.live)
        a = p.live.offset + p.start
        view = buf[pos : pos + n]
        source.assemble_into(a, a + n, view, streams)
        if source.replicas:
            checks.append((source, a, a + n, view))
        segments.append((p.shard, p.offset, view, width(p.live)))
        pos += n
    events = []
    for st in streams.values():
        ev = torch.cuda.Event()
        ev.record(st)
        events.append(ev)
    return sum(p.stop - p.start for p in parts), segments, checks, events
