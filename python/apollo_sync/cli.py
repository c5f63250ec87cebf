"""The ``apollo-sync`` command (also ``python -m apollo_sync``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from apollo_sync import journal as gens
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
    # getrusage charges a page-cache write the whole folio it dirties; the disk's own
    # counter shows what reached it
    print(
        f"{verb:<14} {_mb(r.bytes_written)}; the disk wrote {disk} "
        f"(getrusage charged {_mb(r.bytes_written_device)})"
    )
    print(
        f"tensors        {r.tensors_synced} synced, {r.tensors_missing} missing, "
        f"{r.tensors_on_disk_only} on disk only"
    )
    for w in r.warnings:
        print(f"apollo-sync: warning: {w}", file=sys.stderr)
    if r.recovered:
        print(f"recovered      undid interrupted generation(s) {r.recovered} first")
    if r.generation is not None:
        log = (
            f"log {_mb(r.log_bytes)}, {r.elements_changed:,} elements changed"
            if r.log_bytes
            else "no log"
        )
        retried = f", redone {r.retries}x (producer stepped)" if r.retries else ""
        disk = "durable on disk" if r.durable else "current in the page cache, flushing"
        print(f"generation     {r.generation} committed ({log}{retried}); {disk}")
    elif not r.dry_run:
        print("generation     unchanged (nothing to write)")
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
        direct_io=args.direct_io,
        threads=args.threads,
        allow_unmatched=args.allow_unmatched,
        progress=not args.json and sys.stderr.isatty(),
        journal=not args.no_journal,
        keep=args.keep,
        undo_budget=args.undo_budget,
        lock_timeout=args.lock_timeout,
        private_copy=args.private_copy,
        durable=args.durable,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print_result(result)
    return 0


def _cmd_watch(args: argparse.Namespace) -> int:
    import signal
    import threading

    from apollo_sync.errors import TornSyncError
    from apollo_sync.watch import watch

    stop = threading.Event()
    # SIGTERM (a service manager stopping it): finish the sync in progress, then stop
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def torn(e: TornSyncError) -> None:
        print(f"apollo-sync: warning: {e}; syncing again after the next step", file=sys.stderr)

    def report(r: SyncResult) -> None:
        if args.json:
            print(json.dumps(r.to_dict()), flush=True)
            return
        for w in r.warnings:
            print(f"apollo-sync: warning: {w}", file=sys.stderr)
        stamp = time.strftime("%H:%M:%S")
        if r.generation is None:
            print(f"{stamp}  no change ({r.seconds:.2f} s)", flush=True)
        else:
            retried = f", redone {r.retries}x" if r.retries else ""
            print(
                f"{stamp}  generation {r.generation}: {_mb(r.total_changed)} changed in "
                f"{len(r.files_changed)} file(s), {r.seconds:.2f} s{retried}",
                flush=True,
            )

    summary = watch(
        args.model_dir,
        handles=args.handles,
        interval=args.interval,
        count=args.count,
        stop=stop,
        on_sync=report,
        on_torn=torn,
        block_size=args.block_size,
        direct_io=args.direct_io,
        threads=args.threads,
        allow_unmatched=args.allow_unmatched,
        journal=not args.no_journal,
        keep=args.keep,
        undo_budget=args.undo_budget,
        lock_timeout=args.lock_timeout,
        durable=args.durable,
    )
    for w in summary.warnings:
        print(f"apollo-sync: warning: {w}", file=sys.stderr)
    if args.json:
        print(json.dumps({"stopped": summary.reason, **vars(summary)}), flush=True)
    else:
        gen = "" if summary.generation is None else f"; at generation {summary.generation}"
        print(f"stopped ({summary.reason}) after {summary.syncs} sync(s){gen}")
    return 0


def _cmd_diagnose(args: argparse.Namespace) -> int:
    from apollo_sync.diagnose import diagnose

    report = diagnose(args.model_dir, handles=args.handles)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.render(limit=None if args.verbose else 20))
    return 0 if report.ok else 1


def _cmd_recover(args: argparse.Namespace) -> int:
    done = gens.recover(args.model_dir, lock_timeout=args.lock_timeout)
    state = gens.history(args.model_dir)
    if args.json:
        print(
            json.dumps(
                {
                    "generation": state.generation,
                    "checkpoint": state.checkpoint,
                    "recovered": None if done is None else vars(done),
                }
            )
        )
        return 0
    if done is None:
        print(
            f"{args.model_dir}: nothing to recover (generation {state.generation}, durable on disk)"
        )
        return 0
    if done.rolled_back:
        print(f"rolled back interrupted generation(s) {done.rolled_back}")
    if done.rolled_forward:
        print(f"checked generation(s) {done.rolled_forward}, whose writes were not yet durable")
    print(
        f"{done.units:,} unit(s) of 4 KiB checked, {done.units_written:,} rewritten "
        f"({_mb(done.bytes_written)}), {done.torn:,} torn; made durable: "
        f"{', '.join(done.files) or 'no file'}"
    )
    print(f"{args.model_dir} is at generation {state.generation}, durable on disk")
    return 0


def render_history(state: gens.History) -> str:
    """The history as a table, newest first."""
    lines = [
        f"{'gen':>5}  {'committed':<19}  {'kind':<14}  {'changed':>12}  {'elements':>13}  "
        f"{'log kept':>12}  {'files':>5}  {'tensors':>7}"
    ]
    for g in reversed(state.history):
        kind = g.kind if g.rollback_to is None else f"rollback to {g.rollback_to}"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(g.time))
        log = _mb(g.log_bytes) if g.log else "-"
        mark = "  <- current" if g.number == state.generation else ""
        if g.number > state.checkpoint:
            mark += " (flushing)" if mark else "  (flushing)"
        lines.append(
            f"{g.number:>5}  {when:<19}  {kind:<14}  {_mb(g.bytes_changed):>12}  "
            f"{g.elements_changed:>13,}  {log:>12}  {len(g.files):>5}  {g.touched:>7}{mark}"
        )
    lines.append(f"{0:>5}  {'(before the first sync)':<19}")
    return "\n".join(lines)


def _cmd_history(args: argparse.Namespace) -> int:
    state = gens.history(args.model_dir)
    if args.json:
        print(
            json.dumps(
                {
                    "generation": state.generation,
                    "checkpoint": state.checkpoint,
                    "rollback_points": state.rollback_points(),
                    "history": [g.to_dict() for g in state],
                },
                indent=2,
            )
        )
    else:
        print(render_history(state))
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    g = gens.rollback(args.model_dir, args.to, lock_timeout=args.lock_timeout)
    print(
        f"{args.model_dir}: rolled back to generation {args.to} as generation {g.number} "
        f"({_mb(g.bytes_changed)} restored in {len(g.files)} file(s); "
        f"`apollo-sync rollback --to {g.number - 1}` undoes it)"
    )
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    dropped = gens.prune(
        args.model_dir, keep=args.keep, max_bytes=args.undo_budget, lock_timeout=args.lock_timeout
    )
    print(
        f"{args.model_dir}: dropped the logs of generation(s) {dropped}"
        if dropped
        else f"{args.model_dir}: nothing to prune"
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from apollo_sync.demo import run_demo

    return run_demo(
        size_mb=args.size_mb,
        steps=args.steps,
        fraction=args.fraction,
        workdir=args.dir,
        block_size=args.block_size,
        mode=args.mode,
        optimizer=args.optimizer,
        lr=args.lr,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="apollo-sync",
        description="Keep a model's safetensors files equal to its live weights, "
        "writing only the blocks that changed.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks and full listings")
    sub = p.add_subparsers(dest="command", required=True)

    def lock(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--lock-timeout",
            type=float,
            default=gens.DEFAULT_LOCK_TIMEOUT,
            help="seconds to wait for another apollo-sync writing the same directory "
            f"(default {gens.DEFAULT_LOCK_TIMEOUT:g})",
        )

    def retention(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--keep",
            type=int,
            default=gens.DEFAULT_KEEP,
            help=f"generations whose logs are kept as rollback points "
            f"(default {gens.DEFAULT_KEEP})",
        )
        sp.add_argument(
            "--undo-budget",
            type=int,
            default=None,
            help="bytes of logs kept at most (default: half the model's size; the newest "
            "generation's is always kept, and none not yet durable in the shards is dropped)",
        )

    def durability(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--durable",
            action="store_true",
            help="return only once the shards are durable on disk. Without it a sync "
            "returns once its log is durable and the files are current through the page "
            "cache; the shards are flushed in the background, and after a power cut the "
            "files are whole only once `apollo-sync recover` has run (every sync runs it "
            "first; a loader that starts at boot should too)",
        )

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
            nargs="+",
            default=None,
            help="handles file exported by the producer "
            "(default: $APOLLO_SYNC_HANDLES or a private per-user path); of a tensor- or "
            "pipeline-parallel producer, rank 0's (the others are found beside it as "
            ".rank<N>) or every rank's",
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
        "--direct-io",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="write the changed blocks with O_DIRECT instead of through the page cache "
        "(the same disk bytes, but it evicts the cached folios around them, which the "
        "next sync then reads back from disk; default: off)",
    )
    s.add_argument(
        "--allow-unmatched",
        action="store_true",
        help="sync what matches and report live tensors with no file counterpart "
        "instead of refusing",
    )
    s.add_argument(
        "--no-journal",
        action="store_true",
        help="skip the log: a crash mid-sync can leave a mix of two generations and there "
        "is no rollback past this sync (the shards are durable when it returns)",
    )
    s.add_argument(
        "--private-copy",
        action="store_true",
        help="replace shards that are symlinks (a Hugging Face cache) or hard links by "
        "private copies (reflinks where possible) instead of refusing",
    )
    retention(s)
    durability(s)
    lock(s)
    s.set_defaults(func=_cmd_sync)

    w = sub.add_parser(
        "watch",
        help="stay running: sync after each producer step (or every --interval seconds), "
        "handles opened once",
    )
    source(w)
    w.add_argument(
        "--interval",
        type=float,
        default=1.0,
        help="seconds between syncs when the producer has no step counter (default 1)",
    )
    w.add_argument(
        "--count",
        type=int,
        default=None,
        help="stop after this many syncs (the first, made at once, counts)",
    )
    w.add_argument(
        "--block-size",
        type=int,
        default=DEFAULT_BLOCK_SIZE,
        help=f"diff/write granularity in bytes, a power of two (default {DEFAULT_BLOCK_SIZE})",
    )
    w.add_argument(
        "--json",
        action="store_true",
        help="print each result as a JSON line, and a last line saying why it stopped",
    )
    w.add_argument("--threads", type=int, default=0, help="worker threads (default: all cores)")
    w.add_argument(
        "--direct-io",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="write with O_DIRECT instead of through the page cache (default: off)",
    )
    w.add_argument(
        "--allow-unmatched",
        action="store_true",
        help="sync what matches instead of refusing unmatched live tensors",
    )
    w.add_argument("--no-journal", action="store_true", help="skip the log")
    retention(w)
    durability(w)
    lock(w)
    w.set_defaults(func=_cmd_watch)

    r = sub.add_parser(
        "recover",
        help="make the files one whole generation, durable on disk: after an interrupted "
        "sync or rollback, or a power cut (run it before loading the model at boot)",
    )
    r.add_argument("--model-dir", type=Path, required=True)
    r.add_argument("--json", action="store_true", help="print the result as JSON")
    lock(r)
    r.set_defaults(func=_cmd_recover)

    h = sub.add_parser("history", help="list the committed generations")
    h.add_argument("--model-dir", type=Path, required=True)
    h.add_argument("--json", action="store_true", help="print the history as JSON")
    h.set_defaults(func=_cmd_history)

    b = sub.add_parser("rollback", help="restore the files to an earlier generation")
    b.add_argument("--model-dir", type=Path, required=True)
    b.add_argument("--to", type=int, required=True, help="the generation to restore")
    lock(b)
    b.set_defaults(func=_cmd_rollback)

    q = sub.add_parser("prune", help="drop the logs of old generations")
    q.add_argument("--model-dir", type=Path, required=True)
    retention(q)
    lock(q)
    q.set_defaults(func=_cmd_prune)

    d = sub.add_parser("diagnose", help="show how live names map onto the files")
    source(d)
    d.add_argument("--json", action="store_true", help="print the report as JSON")
    d.set_defaults(func=_cmd_diagnose)

    m = sub.add_parser("demo", help="run the whole job on a generated model (no GPU needed)")
    m.add_argument("--size-mb", type=int, default=64, help="model size (default 64 MB)")
    m.add_argument("--steps", type=int, default=5, help="training steps (default 5)")
    m.add_argument(
        "--mode",
        choices=("train", "sparse"),
        default="train",
        help="train: real optimizer steps of a transformers model on the live weights "
        "(default); sparse: change one element in --fraction of the 4 KiB blocks",
    )
    m.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw", help="(default adamw)")
    m.add_argument("--lr", type=float, default=1e-5, help="learning rate (default 1e-5)")
    m.add_argument(
        "--fraction",
        type=float,
        default=0.005,
        help="--mode sparse: fraction of 4 KiB blocks each step changes (default 0.005)",
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
    except (ApolloSyncError, ImportError, OSError, TypeError, ValueError) as e:
        if args.verbose:
            traceback.print_exc()
        msg = str(e).strip() or type(e).__name__
        print(f"apollo-sync: error: {type(e).__name__}: {msg}", file=sys.stderr)
        for note in getattr(e, "__notes__", []):
            print(f"apollo-sync: note: {note}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("apollo-sync: interrupted", file=sys.stderr)
        return 130
