"""Type stubs for the compiled core (checked against the binary by mypy.stubtest)."""

import os
from collections.abc import Sequence
from typing import Any, final

__all__ = [
    "MAX_BLOCK",
    "MIN_BLOCK",
    "ApolloSyncError",
    "Header",
    "HeaderError",
    "PlanError",
    "ShardChangedError",
    "ShardReport",
    "SyncIOError",
    "Syncer",
    "TensorEntry",
    "__version__",
    "read_header",
]

__version__: str
MIN_BLOCK: int
MAX_BLOCK: int

class ApolloSyncError(Exception): ...
class HeaderError(ApolloSyncError): ...
class ShardChangedError(ApolloSyncError): ...
class SyncIOError(ApolloSyncError): ...
class PlanError(ApolloSyncError): ...

@final
class TensorEntry:
    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> list[int]: ...
    @property
    def start(self) -> int: ...
    @property
    def end(self) -> int: ...

@final
class Header:
    @property
    def path(self) -> str: ...
    @property
    def data_start(self) -> int: ...
    @property
    def file_len(self) -> int: ...
    @property
    def metadata(self) -> dict[str, str] | None: ...
    @property
    def tensors(self) -> list[TensorEntry]: ...

def read_header(path: str | os.PathLike[str]) -> Header: ...

@final
class ShardReport:
    @property
    def path(self) -> str: ...
    @property
    def bytes_compared(self) -> int: ...
    @property
    def bytes_changed(self) -> int: ...
    @property
    def blocks_changed(self) -> int: ...
    @property
    def bytes_written_direct(self) -> int: ...
    @property
    def bytes_written_buffered(self) -> int: ...
    @property
    def writes(self) -> int: ...
    @property
    def direct_io_fallback(self) -> str | None: ...

@final
class Syncer:
    def __new__(
        cls,
        shards: Sequence[tuple[str | os.PathLike[str], int, int]],
        *,
        block_size: int = 4096,
        dry_run: bool = False,
        direct_io: bool = True,
        threads: int = 0,
    ) -> Syncer: ...
    # The third item is any C-contiguous byte buffer (bytes, memoryview, numpy uint8).
    def feed(self, segments: Sequence[tuple[int, int, Any]]) -> None: ...
    def finish(self) -> list[ShardReport]: ...
