"""Type stubs for the compiled core (checked against the binary by mypy.stubtest)."""

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, final

__all__ = [
    "FAULTS",
    "HISTORY_LIMIT",
    "HOLD_BYTES",
    "LOG_MIN_BLOCK",
    "MAX_BLOCK",
    "MIN_BLOCK",
    "WRITEBACK_BYTES",
    "ApolloSyncError",
    "GenerationFlush",
    "Header",
    "HeaderError",
    "JournalError",
    "LogInfo",
    "LogWriter",
    "PlanError",
    "Recovered",
    "RollbackError",
    "ShardChangedError",
    "ShardReport",
    "SyncIOError",
    "Syncer",
    "TensorEntry",
    "__version__",
    "commit_logged",
    "commit_unlogged",
    "ensure_dirs",
    "load_state",
    "prune",
    "read_header",
    "read_log",
    "recover_generations",
    "rollback_generations",
    "undo_uncommitted",
]

__version__: str
MIN_BLOCK: int
MAX_BLOCK: int
HOLD_BYTES: int
WRITEBACK_BYTES: int
LOG_MIN_BLOCK: int
FAULTS: bool
HISTORY_LIMIT: int

class ApolloSyncError(Exception): ...
class HeaderError(ApolloSyncError): ...
class ShardChangedError(ApolloSyncError): ...
class SyncIOError(ApolloSyncError): ...
class PlanError(ApolloSyncError): ...
class JournalError(ApolloSyncError): ...
class RollbackError(ApolloSyncError): ...

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
    def elements_changed(self) -> int: ...
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
        direct_io: bool = False,
        threads: int = 0,
        log: tuple[str | os.PathLike[str], int] | None = None,
        hold_bytes: int = ...,
        writeback_bytes: int = ...,
    ) -> Syncer: ...
    # (shard, offset, live, width): live is any C-contiguous byte buffer (bytes,
    # memoryview, numpy uint8) or (fd, offset, length); width is 1, 2, 4 or 8.
    def feed(self, segments: Sequence[tuple[int, int, Any, int]]) -> None: ...
    def abort(self) -> None: ...
    def finish(self) -> list[ShardReport]: ...
    def log_writer(self) -> LogWriter | None: ...
    def timings(self) -> list[tuple[str, float]]: ...

@final
class LogInfo:
    @property
    def path(self) -> Path: ...
    @property
    def generation(self) -> int: ...
    @property
    def kind(self) -> str: ...
    @property
    def committed(self) -> bool: ...
    @property
    def meta(self) -> str | None: ...
    @property
    def shards(self) -> list[str]: ...
    @property
    def records(self) -> int: ...
    @property
    def bytes(self) -> int: ...
    @property
    def elements(self) -> int: ...
    @property
    def covered(self) -> int: ...
    @property
    def torn_tail(self) -> int: ...
    @property
    def runs(self) -> list[tuple[int, int, int, int]]: ...

@final
class LogWriter:
    @property
    def path(self) -> Path: ...
    @property
    def shards(self) -> list[str]: ...
    def runs(self) -> list[tuple[int, int, int, int]]: ...

@final
class GenerationFlush:
    def __new__(
        cls,
        number: int,
        paths: Sequence[str | os.PathLike[str]],
        marker: str | os.PathLike[str],
        after: GenerationFlush | None = None,
    ) -> GenerationFlush: ...
    @property
    def number(self) -> int: ...
    @property
    def running(self) -> bool: ...
    @property
    def error(self) -> str | None: ...
    def wait(self) -> str | None: ...

@final
class Recovered:
    @property
    def generation(self) -> int: ...
    @property
    def rolled_back(self) -> list[int]: ...
    @property
    def rolled_forward(self) -> list[int]: ...
    @property
    def units(self) -> int: ...
    @property
    def units_written(self) -> int: ...
    @property
    def torn(self) -> int: ...
    @property
    def bytes_written(self) -> int: ...
    @property
    def files(self) -> list[str]: ...

def read_log(path: str | os.PathLike[str]) -> LogInfo: ...
def ensure_dirs(root: str | os.PathLike[str], meta: str | os.PathLike[str]) -> None: ...
def load_state(
    root: str | os.PathLike[str], meta: str | os.PathLike[str]
) -> tuple[int, int, list[dict[str, Any]]]: ...
def commit_logged(
    root: str | os.PathLike[str],
    meta: str | os.PathLike[str],
    writer: LogWriter,
    *,
    bytes_changed: int,
    files: Sequence[str],
    tensors: Mapping[str, int],
    rollback_to: int | None = None,
) -> dict[str, Any]: ...
def commit_unlogged(
    root: str | os.PathLike[str],
    meta: str | os.PathLike[str],
    number: int,
    *,
    bytes_changed: int,
    files: Sequence[str],
) -> dict[str, Any]: ...
def undo_uncommitted(
    root: str | os.PathLike[str], meta: str | os.PathLike[str], number: int
) -> None: ...
def prune(
    root: str | os.PathLike[str],
    meta: str | os.PathLike[str],
    keep: int,
    max_bytes: int | None = None,
) -> list[int]: ...
def recover_generations(
    root: str | os.PathLike[str],
    meta: str | os.PathLike[str],
    settle: Callable[[int, bool], bool],
    limit: int | None = None,
) -> Recovered | None: ...
def rollback_generations(
    root: str | os.PathLike[str], meta: str | os.PathLike[str], to: int
) -> dict[str, Any]: ...
