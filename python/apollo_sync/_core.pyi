"""Type stubs for the compiled core (checked against the binary by mypy.stubtest)."""

import os
from collections.abc import Sequence
from typing import Any, final

__all__ = [
    "HOLD_BYTES",
    "MAX_BLOCK",
    "MIN_BLOCK",
    "ApolloSyncError",
    "Header",
    "HeaderError",
    "JournalError",
    "JournalInfo",
    "PlanError",
    "ShardChangedError",
    "ShardReport",
    "SyncIOError",
    "Syncer",
    "TensorEntry",
    "UndoReport",
    "__version__",
    "read_header",
    "read_journal",
    "rollback_journals",
    "undo_journal",
]

__version__: str
MIN_BLOCK: int
MAX_BLOCK: int
HOLD_BYTES: int

class ApolloSyncError(Exception): ...
class HeaderError(ApolloSyncError): ...
class ShardChangedError(ApolloSyncError): ...
class SyncIOError(ApolloSyncError): ...
class PlanError(ApolloSyncError): ...
class JournalError(ApolloSyncError): ...

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
    def bytes_journaled(self) -> int: ...
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
        journal: tuple[str | os.PathLike[str], int] | None = None,
        hold_bytes: int = ...,
    ) -> Syncer: ...
    # The third item is any C-contiguous byte buffer (bytes, memoryview, numpy uint8).
    def feed(self, segments: Sequence[tuple[int, int, Any]]) -> None: ...
    def finish(self) -> list[ShardReport]: ...

@final
class JournalInfo:
    @property
    def path(self) -> str: ...
    @property
    def generation(self) -> int: ...
    @property
    def shards(self) -> list[str]: ...
    @property
    def records(self) -> int: ...
    @property
    def bytes(self) -> int: ...
    @property
    def torn_tail(self) -> int: ...
    @property
    def runs(self) -> list[tuple[int, int, int]]: ...

@final
class UndoReport:
    @property
    def records(self) -> int: ...
    @property
    def bytes(self) -> int: ...
    @property
    def files(self) -> list[str]: ...

def read_journal(path: str | os.PathLike[str]) -> JournalInfo: ...
def undo_journal(path: str | os.PathLike[str], model_dir: str | os.PathLike[str]) -> UndoReport: ...
def rollback_journals(
    paths: Sequence[str | os.PathLike[str]],
    model_dir: str | os.PathLike[str],
    new_path: str | os.PathLike[str],
    generation: int,
) -> UndoReport: ...
