"""Header validation in the core: every malformed file is refused with a HeaderError."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from apollo_sync._core import read_header
from apollo_sync.errors import ApolloSyncError, HeaderError


def raw_file(path: Path, header: dict[str, object], data: bytes, pad: int = 0) -> Path:
    js = json.dumps(header).encode() + b" " * pad
    path.write_bytes(struct.pack("<Q", len(js)) + js + data)
    return path


def test_reads_what_safetensors_wrote(tmp_path: Path) -> None:
    tensors = {"b": torch.zeros(3, 5, dtype=torch.float16), "a": torch.ones(7, dtype=torch.int32)}
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata={"format": "pt"})
    h = read_header(tmp_path / "m.safetensors")
    assert h.metadata == {"format": "pt"}
    assert [t.name for t in h.tensors] == sorted(
        [t.name for t in h.tensors], key=lambda n: next(x.start for x in h.tensors if x.name == n)
    )
    by = {t.name: t for t in h.tensors}
    assert by["b"].dtype == "F16" and by["b"].shape == [3, 5] and by["b"].end - by["b"].start == 30
    assert h.tensors[0].start == h.data_start and h.tensors[-1].end == h.file_len


@pytest.mark.parametrize("pad", [0, 1, 3, 5, 4000])
def test_unaligned_header_lengths_are_fine(tmp_path: Path, pad: int) -> None:
    data = bytes(range(16))
    p = raw_file(
        tmp_path / "x.safetensors",
        {"t": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]}},
        data,
        pad,
    )
    h = read_header(p)
    assert h.data_start == p.stat().st_size - 16
    assert load_file(p)["t"].tolist() == list(range(16))


BAD = {
    "overlap": (
        {
            "a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
            "b": {"dtype": "U8", "shape": [8], "data_offsets": [4, 12]},
        },
        12,
    ),
    "gap": (
        {
            "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
            "b": {"dtype": "U8", "shape": [4], "data_offsets": [8, 12]},
        },
        12,
    ),
    "size_vs_shape": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, 8),
    "truncated": ({"a": {"dtype": "U8", "shape": [64], "data_offsets": [0, 64]}}, 10),
    "trailing": ({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}, 9),
    "bad_dtype": ({"a": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 4]}}, 4),
    "not_object": ([1, 2, 3], 0),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_headers_are_refused(tmp_path: Path, case: str) -> None:
    header, n = BAD[case]
    p = raw_file(tmp_path / f"{case}.safetensors", header, bytes(n))  # type: ignore[arg-type]
    with pytest.raises(HeaderError) as e:
        read_header(p)
    assert str(p) in str(e.value)


def test_bad_length_prefix_and_json(tmp_path: Path) -> None:
    p = tmp_path / "a.safetensors"
    p.write_bytes(b"\x01\x02")
    with pytest.raises(HeaderError, match="shorter than"):
        read_header(p)
    p.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(HeaderError, match="limit"):
        read_header(p)
    p.write_bytes(struct.pack("<Q", 500) + b"{}")
    with pytest.raises(HeaderError, match="past the end"):
        read_header(p)
    p.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(HeaderError):
        read_header(p)


def test_missing_file_is_an_io_error_with_the_path(tmp_path: Path) -> None:
    with pytest.raises(ApolloSyncError, match="nothing.safetensors"):
        read_header(tmp_path / "nothing.safetensors")


def test_errors_pickle_by_dotted_path() -> None:
    import pickle

    e = pickle.loads(pickle.dumps(HeaderError("x")))
    assert type(e) is HeaderError and type(e).__module__ == "apollo_sync._core"
