"""The ``apollo-sync`` command (also ``python -m apollo_sync``)."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from apollo_sync.errors import ApolloSyncError
from apollo_sync.sync import DEFAULT_BLOCK_SIZE, SyncResult


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f} MB"


def print_result(r: SyncResult) -> None:
    """A readable summary of a sync."""
    verb = "would write" if r.dry_run else "wrote"
    pct = 100 * r.total_changed / r.total_compared if r.total_compared else 0.0
    print(f"model dir      {r.model_dir}")
    print(
        f"compared       {r.total_compared / 1e9:,.3f} GB in {r.seconds:.2f} s "
        f"({r.gb_per_s:.2f} GB/s)"
    )
    print(f"changed        {_mb(r.total_changed)} ({pct:.3f}%) in {len(r.files_changed)} file(s)")
    disk = "n/a" if r.disk_bytes_written is None else _mb(r.disk_bytes_written)
    print(
        f"{verb:<14} {_mb(r.bytes_written)}; kernel-accounted {_mb(r.bytes_written_device)}; "
        f"disk {disk}"
    )
    print(
        f"tensors        {r.tensors_synced} synced, {r.tensors_missing} missing, "
        f"{r.tensors_on_disk_only} on disk only"
    )
    if r.files_changed:
        width = max(len(f.file) for f in r.files)
        print(f"\n{'file':<{width}}  {'compared':>12}  {'changed':>12}  {'writes':>6}")
        for f in r.files:
            if f.bytes_changed:
                print(
                    f"{f.file:<{width}}  {_mb(f.bytes_compared):>12}  {_mb(f.bytes_changed):>12}  "
                    f"{f.writes:>6}"
                )
    if r.missing:
        print(
            f"\nmissing (not synced): {', '.join(r.missing[:10])}"
            + (" ..." if len(r.missing) > 10 else "")
        )


def _cmd_sync(args: argparse.Namespace) -> int:
    from apollo_sync.sync import sync

    result = sync(
        args.model_dir,
        handles=args.handles,
        block_size=args.block_size,
        dry_run=args.dry_run,
        direct_io=not args.no_direct_io,
        threads=args.threads,
        allow_unmatched=args.allow_unmatched,
        progress=not args.json and sys.stderr.isatty(),
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print_result(result)
    return 0


def _cmd_diagnose(args: argparse.Namespace) -> int:
    from apollo_sync.diagnose import diagnose

    report = diagnose(args.model_dir, handles=args.handles)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.render(limit=None if args.verbose else 20))
    return 0 if report.ok else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from apollo_sync.demo import run_demo

    return run_demo(
        size_mb=args.size_mb,
        steps=args.steps,
        fraction=args.fraction,
        workdir=args.dir,
        block_size=args.block_size,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="apollo-sync",
        description="Keep a model's safetensors files equal to its live weights, "
        "writing only the blocks that changed.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks and full listings")
    sub = p.add_subparsers(dest="command", required=True)

    def source(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--model-dir",
            type=Path,
            default=None,
            help="the checkpoint directory (default: the handles' model_path)",
        )
        sp.add_argument(
            "--handles",
            type=Path,
            default=None,
            help="handles file exported by the producer "
            "(default: $APOLLO_SYNC_HANDLES or a private per-user path)",
        )

    s = sub.add_parser("sync", help="write the live weights' changed blocks into the files")
    source(s)
    s.add_argument(
        "--block-size",
        type=int,
        default=DEFAULT_BLOCK_SIZE,
        help=f"diff/write granularity in bytes, a power of two (default {DEFAULT_BLOCK_SIZE})",
    )
    s.add_argument("--dry-run", action="store_true", help="compare and report, write nothing")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.add_argument("--threads", type=int, default=0, help="worker threads (default: all cores)")
    s.add_argument(
        "--no-direct-io",
        action="store_true",
        help="write through the page cache instead of O_DIRECT",
    )
    s.add_argument(
        "--allow-unmatched",
        action="store_true",
        help="sync what matches and report live tensors with no file counterpart "
        "instead of refusing",
    )
    s.set_defaults(func=_cmd_sync)

    d = sub.add_parser("diagnose", help="show how live names map onto the files")
    source(d)
    d.add_argument("--json", action="store_true", help="print the report as JSON")
    d.set_defaults(func=_cmd_diagnose)

    m = sub.add_parser("demo", help="run the whole job on a generated model (no GPU needed)")
    m.add_argument("--size-mb", type=int, default=256, help="model size (default 256 MB)")
    m.add_argument("--steps", type=int, default=3, help="training-like steps (default 3)")
    m.add_argument(
        "--fraction",
        type=float,
        default=0.005,
        help="fraction of 4 KiB blocks each step changes (default 0.005)",
    )
    m.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    m.add_argument(
        "--dir", type=Path, default=None, help="keep the model here (default: a temp dir)"
    )
    m.set_defaults(func=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except (ApolloSyncError, OSError, TypeError, ValueError) as e:
        if args.verbose:
            traceback.print_exc()
        msg = str(e).strip() or type(e).__name__
        print(f"apollo-sync: error: {type(e).__name__}: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("apollo-sync: interrupted", file=sys.stderr)
        return 130
