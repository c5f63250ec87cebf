"""How the ``apollo-sync`` command shows what the library logs.

The package logs through ``logging.getLogger("apollo_sync")`` (and its children,
``apollo_sync.sync``, ``apollo_sync.journal``, ...) and never prints: an
application that imports it decides where its records go. The library only adds
a :class:`logging.NullHandler` (``__init__.py``), as the logging HOWTO asks of
libraries. The command line configures a handler on stderr here:

- ``text``: ``apollo-sync: warning: <message>``, one line a record (journald and
  cron add their own timestamps);
- ``json``: one JSON object a line for log shippers: ``time`` (ISO 8601, UTC),
  ``level``, ``logger``, ``message`` and the record's structured fields (a sync
  record carries ``event``, ``model_dir``, ``generation``, ``seconds``, byte
  counts, ...), plus ``exc`` with the traceback where there is one.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any

LOGGER = "apollo_sync"
FORMATS = ("text", "json")

#: Attributes every LogRecord has: what is not among them came in ``extra=``.
_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)


def structured(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a record was given with ``extra=``."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class TextFormatter(logging.Formatter):
    """``apollo-sync: warning: <message>``; the traceback follows when asked."""

    def __init__(self, tracebacks: bool) -> None:
        super().__init__()
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        line = f"apollo-sync: {record.levelname.lower()}: {record.getMessage()}"
        if self.tracebacks and record.exc_info:
            line += "\n" + self.formatException(record.exc_info).rstrip()
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line (no newline inside: tracebacks are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(structured(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def level_for(verbose: int, quiet: int, fmt: str = "text") -> int:
    """``-q``: errors only; default: warnings (with ``json``, what each sync did
    too: a shipper wants every event); ``-v``: what each sync did; ``-vv``: debug."""
    if quiet:
        return logging.ERROR
    if fmt == "json":
        verbose = max(verbose, 1)
    return {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)


def configure(
    *, verbose: int = 0, quiet: int = 0, fmt: str = "text", stream: IO[str] | None = None
) -> logging.Handler:
    """Sends the package's records to ``stream`` (stderr) in ``fmt``; replaces a
    handler an earlier call installed (so calling it twice does not log twice)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: one of {', '.join(FORMATS)}")
    logger = logging.getLogger(LOGGER)
    for h in list(logger.handlers):
        if getattr(h, "_apollo_sync_cli", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(verbose > 0))
    handler._apollo_sync_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level_for(verbose, quiet, fmt))
    logger.propagate = False  # the command's own handler: no double lines via the root
    return handler
