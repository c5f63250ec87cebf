"""End-to-end syncs on real files: bytes equal, only changed blocks written,
bad input refused before any write."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import apollo_sync
from apollo_sync import LayoutError, ModelDirError, PlanError, ShardChangedError, sync
from apollo_sync._core import Syncer, read_header
from conftest import dir_digest, randn

Factory = Callable[..., Path]


def loaded(root: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for p in sorted(root.glob("*.safetensors")):
        out |= load_file(p)
    return out


def assert_files_equal_live(root: Path, live: dict[str, torch.Tensor]) -> None:
    disk = loaded(root)
    assert set(disk) == set(live)
    for name, t in live.items():
        assert disk[name].dtype == t.dtype, name
        # bytewise, so NaN payloads and -0.0 count too
        assert torch.equal(
            disk[name].reshape(-1).view(torch.uint8), t.reshape(-1).contiguous().view(torch.uint8)
        ), name


def base_tensors(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {
        "model.embed_tokens.weight": randn(300, 64, dtype=dtype, seed=1),
        "model.layers.0.input_layernorm.weight": randn(64, dtype=dtype, seed=2),
        "model.layers.0.mlp.down_proj.weight": randn(64, 333, dtype=dtype, seed=3),
        "model.layers.0.self_attn.o_proj.weight": randn(64, 64, dtype=dtype, seed=4),
        "model.norm.weight": randn(64, dtype=dtype, seed=5),
        "lm_head.weight": randn(300, 64, dtype=dtype, seed=6),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shards", [1, 3])
def test_sync_makes_files_equal_live(
    model_factory: Factory, dtype: torch.dtype, shards: int
) -> None:
    orig = base_tensors(dtype)
    root = model_factory(orig, shards=shards)
    live = {k: v.clone() for k, v in orig.items()}
    live["model.layers.0.mlp.down_proj.weight"][5, 7] += 1
    live["model.norm.weight"][-1] = 3.0
    live["lm_head.weight"][0, 0] = -live["lm_head.weight"][0, 0] - 1
    r = sync(root, live)
    assert_files_equal_live(root, live)
    assert r.tensors_synced == len(live) and r.tensors_missing == 0
    assert 0 < r.total_changed <= 3 * 2 * 4096  # at most two blocks per edit
    assert r.bytes_written == r.total_changed
    assert r.total_compared == sum(t.nbytes for t in live.values())
    again = sync(root, live)
    assert again.total_changed == 0 and again.bytes_written == 0 and again.files_changed == []


def test_every_dtype_is_bytes(model_factory: Factory) -> None:
    g = torch.Generator().manual_seed(0)
    orig = {
        "f64": torch.randn(100, generator=g, dtype=torch.float64),
        "i64": torch.randint(-9, 9, (300,), generator=g),
        "i32": torch.randint(-9, 9, (301,), generator=g, dtype=torch.int32),
        "i8": torch.randint(-9, 9, (999,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (77,), generator=g, dtype=torch.uint8),
        "b": torch.rand(1001, generator=g) > 0.5,
        "f8": torch.randn(5000, generator=g).to(torch.float8_e4m3fn),
        "f8b": torch.randn(333, generator=g).to(torch.float8_e5m2),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 4),
    }
    root = model_factory(orig)
    live = {k: v.clone() for k, v in orig.items()}
    live["b"][1000] = not bool(live["b"][1000])
    live["f8"][10] = torch.tensor(0.5).to(torch.float8_e4m3fn)
    live["i8"][998] += 1
    live["scalar"].fill_(-2.0)
    r = sync(root, live)
    assert r.total_changed > 0
    assert_files_equal_live(root, live)


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
@pytest.mark.parametrize("journal", [True, False])
def test_only_changed_blocks_are_rewritten(
    model_factory: Factory, journal: bool, direct: bool
) -> None:
    orig = {"w": randn(4096, 256, dtype=torch.float16), "tail": randn(1000, dtype=torch.float16)}
    root = model_factory(orig)
    path = root / "model.safetensors"
    before = np.fromfile(path, dtype=np.uint8)
    live = {k: v.clone() for k, v in orig.items()}
    flat = live["w"].view(-1)
    rng = np.random.default_rng(0)
    for i in rng.choice(flat.numel(), 40, replace=False):
        flat[int(i)] += 1
    live["tail"][-1] += 1  # the file's last, short block
    r = sync(root, live, block_size=4096, journal=journal, direct_io=direct)
    after = np.fromfile(path, dtype=np.uint8)
    nblocks = -(-len(before) // 4096)
    changed = [
        b
        for b in range(nblocks)
        if not np.array_equal(before[b * 4096 : (b + 1) * 4096], after[b * 4096 : (b + 1) * 4096])
    ]
    changed_bytes = sum(min(4096, len(before) - b * 4096) for b in changed)
    assert r.total_changed == changed_bytes  # nothing outside them was written
    assert r.bytes_written == changed_bytes
    assert r.files[0].blocks_changed == len(changed)
    # 41 elements of 2 bytes changed; the log holds their XOR, element by element
    assert r.elements_changed == (41 if journal else 0)
    assert (r.log_bytes > 0) == journal and r.log_bytes < changed_bytes / 4
    if direct and r.files[0].direct_io_fallback is None:
        # what the kernel accounted as written to the device: the changed blocks
        # (getrusage charges a buffered write a whole folio, so only direct writes
        # can be checked this way; the device's own counter, which shows the same
        # bytes for both, is measured in benches/, not here, where other writers
        # on the disk would make it flaky); with the log, its bytes as well
        assert r.files[0].bytes_written_buffered < 4096  # only the short last block
        assert r.bytes_written_device <= 1.1 * changed_bytes + r.log_bytes + 4096
    assert_files_equal_live(root, live)


@pytest.mark.parametrize("block", [512, 4096, 65536])
def test_block_sizes_and_tensors_straddling_blocks(model_factory: Factory, block: int) -> None:
    # many small tensors share blocks with each other and with the header
    orig = {f"t{i:03d}": randn(37 + i, dtype=torch.float32, seed=i) for i in range(60)}
    root = model_factory(orig)
    live = {k: v.clone() for k, v in orig.items()}
    for i in range(0, 60, 7):  # neighbours in one block change in the same sync
        live[f"t{i:03d}"][0] += 1
        live[f"t{i:03d}"][-1] += 1
    path = root / "model.safetensors"
    before = np.fromfile(path, dtype=np.uint8)
    # the log hashes whole 4 KiB units: smaller blocks sync without it
    r = sync(root, live, block_size=block, journal=block >= 4096)
    after = np.fromfile(path, dtype=np.uint8)
    changed = sum(
        len(a)
        for a, b in zip(
            np.array_split(before, range(block, len(before), block)),
            np.array_split(after, range(block, len(after), block)),
            strict=True,
        )
        if not np.array_equal(a, b)
    )
    assert r.total_changed == changed > 0
    assert_files_equal_live(root, live)


def test_dry_run_changes_nothing(model_factory: Factory) -> None:
    orig = base_tensors(torch.bfloat16)
    root = model_factory(orig, shards=2)
    live = {k: v + 1 for k, v in orig.items()}
    digest = dir_digest(root)
    r = sync(root, live, dry_run=True)
    assert r.total_changed > 0 and r.bytes_written == 0
    assert dir_digest(root) == digest


def test_stages_say_where_the_time_went(model_factory: Factory) -> None:
    orig = base_tensors(torch.bfloat16)
    root = model_factory(orig, shards=2)
    live = {k: v + 1 for k, v in orig.items()}
    dry = sync(root, live, dry_run=True).stages
    assert dry["barriers"] == 0 and dry["write"] == 0 and "commit" not in dry
    assert 0 < dry["feed"] <= dry["stream"]

    logged = sync(root, live)
    st = logged.stages
    assert logged.generation is not None
    assert st["barriers"] >= 1 and st["barrier"] > 0
    # both shards changed: two writer threads, each busy for part of the total
    assert 0 < st["write_busiest"] < st["write"]
    assert 0 < st["feed"] <= st["stream"] <= logged.seconds
    assert st["finish"] > 0 and st["commit"] > 0 and "after_commit" in st
    assert_files_equal_live(root, live)

    again = {k: v + 1 for k, v in live.items()}
    unlogged = sync(root, again, journal=False).stages
    assert unlogged["barriers"] == 0 and unlogged["write"] > 0
    assert unlogged["finish"] > 0  # the fdatasync of the written shards


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_write_modes_write_the_same_bytes(model_factory: Factory, direct: bool) -> None:
    orig = base_tensors(torch.float16)
    root = model_factory(orig)
    live = {k: v * 2 for k, v in orig.items()}
    r = sync(root, live, direct_io=direct)
    f = r.files[0]
    assert f.bytes_written == r.bytes_written > 0
    if not direct:
        assert f.bytes_written_buffered == r.bytes_written
    elif f.direct_io_fallback is None:  # only the file's short last block is buffered
        assert f.bytes_written_buffered < 4096
    assert_files_equal_live(root, live)


def _uncached_pages(path: Path) -> int:
    """Pages of ``path`` not in the page cache (a read with RWF_NOWAIT would block)."""
    buf = bytearray(4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        missing = 0
        for off in range(0, os.fstat(fd).st_size, 4096):
            try:
                os.preadv(fd, [buf], off, os.RWF_NOWAIT)
            except BlockingIOError:
                missing += 1
            except OSError as e:  # no RWF_NOWAIT here
                pytest.skip(f"cannot tell what is cached: {e}")
        return missing
    finally:
        os.close(fd)


def _cache_as_a_reader_would(path: Path) -> None:
    """Flushes ``path``, drops it from the page cache and reads it back, as a
    process loading the model leaves it cached (readahead's large folios)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    path.read_bytes()


def _cached_then_synced(root: Path, live: dict[str, torch.Tensor], **kw: object) -> int:
    """Caches the model as a reader leaves it, syncs, and counts the pages the
    sync left uncached."""
    path = root / "model.safetensors"
    _cache_as_a_reader_would(path)
    if _uncached_pages(path):
        pytest.skip("this filesystem does not keep the file cached")
    r = sync(root, live, **kw)
    assert r.total_changed > 0
    uncached = _uncached_pages(path)
    assert_files_equal_live(root, live)  # (reads the file: counted before)
    return uncached


def test_a_default_sync_leaves_the_file_cached(model_factory: Factory) -> None:
    # The next sync reads the whole file again: a sync must not evict what it
    # compared, as an O_DIRECT write does (the cached folio around its block).
    orig = {"w": randn(2048, 2048, dtype=torch.float16)}  # 8 MiB
    live = {"w": orig["w"].clone()}
    flat = live["w"].view(-1)
    for i in range(0, flat.numel(), 100_003):  # scattered over the whole file
        flat[i] += 1
    if _cached_then_synced(model_factory(orig), live, direct_io=True) == 0:
        pytest.skip("direct writes evict nothing on this filesystem: nothing to tell apart")
    assert _cached_then_synced(model_factory(orig), live) == 0


def test_page_cache_writes_reach_the_disk_as_the_changed_blocks(model_factory: Factory) -> None:
    # The default writes through the page cache; the disk must still receive only
    # the changed blocks, not the large folios around them (getrusage charges the
    # whole folio, so the block device's own counter is what is checked).
    orig = {"w": randn(4096, 8192, dtype=torch.float16)}  # 64 MiB
    root = model_factory(orig)
    _cache_as_a_reader_would(root / "model.safetensors")
    live = {"w": orig["w"].clone()}
    flat = live["w"].view(-1)
    for i in range(0, flat.numel(), flat.numel() // 200):  # 200 blocks, 160 KiB apart
        flat[i] += 1
    os.sync()  # nothing else of this process is left to write back meanwhile
    r = sync(root, live, journal=False)
    if r.disk_bytes_written is None:
        pytest.skip("no block device under the model directory")
    assert r.bytes_written == r.total_changed >= 200 * 4096
    # a little slack for the filesystem's own metadata
    assert r.disk_bytes_written <= 1.1 * r.total_changed + (256 << 10), r
    assert_files_equal_live(root, live)


def test_disk_bytes_far_above_the_written_ones_warn(
    model_factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    orig = base_tensors(torch.float16)
    root = model_factory(orig)
    live = {k: v * 2 for k, v in orig.items()}
    sectors = iter([0, 1 << 20])  # the disk's counter, before and after: 512 MiB
    sync_module = sys.modules["apollo_sync.sync"]  # apollo_sync.sync is the function
    monkeypatch.setattr(sync_module, "_disk_sectors_written", lambda _: next(sectors))
    r = sync(root, live)
    assert r.disk_bytes_written == 512 << 20
    assert any("whole folios" in w and "--direct-io" in w for w in r.warnings), r.warnings
    assert_files_equal_live(root, live)


# --- every validation failure leaves the files unchanged ---------------------------------


def _refused(root: Path, exc: type[BaseException], match: str, **kw: object) -> None:
    digest = dir_digest(root)
    with pytest.raises(exc, match=match):
        sync(root, **kw)  # type: ignore[arg-type]
    assert dir_digest(root) == digest


def test_shape_mismatch_is_refused(model_factory: Factory) -> None:
    orig = base_tensors(torch.bfloat16)
    root = model_factory(orig, shards=2)
    live = {k: v + 1 for k, v in orig.items()}
    live["model.norm.weight"] = torch.ones(65, dtype=torch.bfloat16)
    _refused(root, LayoutError, "model.norm.weight.*shape", tensors=live)


def test_dtype_mismatch_is_refused(model_factory: Factory) -> None:
    orig = base_tensors(torch.bfloat16)
    root = model_factory(orig)
    live = {k: v + 1 for k, v in orig.items()}
    live["lm_head.weight"] = live["lm_head.weight"].float()
    _refused(root, LayoutError, "lm_head.weight.*F32.*BF16", tensors=live)


def test_unmatched_name_is_refused_or_counted(model_factory: Factory) -> None:
    orig = base_tensors(torch.bfloat16)
    root = model_factory(orig)
    live = {k: v + 1 for k, v in orig.items()} | {"model.extra.weight": torch.ones(3)}
    _refused(root, LayoutError, "model.extra.weight", tensors=live)
    r = sync(root, live, allow_unmatched=True)
    assert r.tensors_missing == 1 and r.missing == ["model.extra.weight"]
    assert r.seeds_dict()["tensors_missing"] == 1


def test_missing_shard_and_bad_index_are_refused(model_factory: Factory) -> None:
    orig = base_tensors(torch.bfloat16)
    root = model_factory(orig, shards=3)
    live = {k: v + 1 for k, v in orig.items()}
    shard = sorted(root.glob("*.safetensors"))[1]
    moved = shard.with_suffix(".bak")
    shard.rename(moved)
    _refused(root, ModelDirError, "do not exist", tensors=live)
    moved.rename(shard)
    idx = root / "model.safetensors.index.json"
    text = idx.read_text()
    idx.write_text(text.replace("model.norm.weight", "model.gone.weight"))
    _refused(root, ModelDirError, "index", tensors=live)
    idx.write_text(text)


def test_corrupt_header_is_refused(model_factory: Factory) -> None:
    orig = base_tensors(torch.float16)
    root = model_factory(orig, shards=2)
    live = {k: v + 1 for k, v in orig.items()}
    shard = sorted(root.glob("*.safetensors"))[1]
    with open(shard, "ab") as f:
        f.write(b"\0")  # trailing byte: the header no longer describes the file
    _refused(root, apollo_sync.HeaderError, "trailing", tensors=live)


def test_bad_block_size_is_refused(model_factory: Factory) -> None:
    orig = base_tensors(torch.float16)
    root = model_factory(orig)
    live = {k: v + 1 for k, v in orig.items()}
    for b in (1000, 256, 0):
        _refused(root, PlanError, "block size", tensors=live, block_size=b)
    # a logged sync needs whole 4 KiB units; without a log 512 is fine
    _refused(root, PlanError, "at least 4096", tensors=live, block_size=512)


def test_shard_changed_after_planning_is_refused(model_factory: Factory) -> None:
    root = model_factory(base_tensors(torch.float16))
    h = read_header(root / "model.safetensors")
    with pytest.raises(ShardChangedError):
        Syncer([(h.path, h.data_start, h.file_len + 1)])


def test_core_rejects_non_contiguous_buffers(model_factory: Factory) -> None:
    root = model_factory(base_tensors(torch.float16))
    h = read_header(root / "model.safetensors")
    s = Syncer([(h.path, h.data_start, h.file_len)])
    strided = np.zeros(100, dtype=np.uint8)[::2]
    with pytest.raises(ValueError, match="contiguous"):
        s.feed([(0, h.data_start, strided, 1)])
    s.finish()
    with pytest.raises(RuntimeError, match="finished"):
        s.finish()


# --- the GIL is released while the core works ----------------------------------------------


def test_gil_is_released_during_sync(tmp_path: Path) -> None:
    n = 96 << 20
    path = tmp_path / "raw.bin"
    disk = np.random.default_rng(0).integers(0, 255, n, dtype=np.uint8)
    disk.tofile(path)
    live = disk.copy()
    live[:: 1 << 20] ^= 1  # one change per MiB
    ticks = 0
    stop = threading.Event()

    def spin() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1

    t = threading.Thread(target=spin)
    t.start()
    time.sleep(0.01)
    s = Syncer([(path, 0, n)], threads=1)
    before = ticks
    s.feed([(0, 0, live, 1)])  # one call: with the GIL held, `spin` could not run at all
    during = ticks - before
    stop.set()
    t.join()
    reports = s.finish()
    assert reports[0].blocks_changed == 96
    assert np.array_equal(np.fromfile(path, dtype=np.uint8), live)
    assert during > 100, during


def test_shards_take_turns_in_the_feed_each_in_file_order() -> None:
    """The feed interleaves shards (so their writes run in parallel in the core)
    but keeps each shard's tensors in offset order, which the core requires."""
    from apollo_sync.live import LiveTensor
    from apollo_sync.stream import Placement, interleave

    def p(shard: int, offset: int, n: int) -> Placement:
        return Placement(shard, offset, LiveTensor("t", "U8", (n,), np.zeros(n, np.uint8)))

    plan = [p(0, o, 10) for o in range(0, 100, 10)] + [p(1, o, 30) for o in range(0, 90, 30)]
    out = interleave(plan, 25)
    assert sorted(out, key=lambda q: (q.shard, q.offset)) == plan  # nothing lost or doubled
    for shard in (0, 1):
        offsets = [q.offset for q in out if q.shard == shard]
        assert offsets == sorted(offsets)
    assert [q.shard for q in out[:5]] == [0, 0, 0, 1, 0]  # 25 bytes of each in turn
    single = [p(0, o, 10) for o in range(0, 50, 10)]
    assert interleave(single, 25) == single
