"""The ``apollo-sync`` command (also ``python -m apollo_sync``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from apollo_sync import journal as gens
from apollo_sync import logconfig
from apollo_sync.errors import ApolloSyncError, PlanError
from apollo_sync.sync import DEFAULT_BLOCK_SIZE, SyncResult


def _count(text: str) -> int:
    """A whole number ≥ 0 that the core takes (``--keep``, ``--undo-budget``)."""
    try:
        return gens.whole(int(text), repr(text), PlanError)
    except (ValueError, PlanError):
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number ≥ 0 is needed") from None


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
    # r.warnings were logged by the sync (stderr, or JSON lines with --log-format json)
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


def _rank0_handles(args: argparse.Namespace) -> Path | None:
    """The handles file that describes the producer: the only one given, or rank
    0's of a set (``--handles`` takes one path or every rank's)."""
    handles = args.handles
    if isinstance(handles, list):
        return Path(handles[0]) if handles else None
    return None if handles is None else Path(handles)


def _model_dir_label(args: argparse.Namespace) -> str | None:
    """The model directory a command will sync: --model-dir, else the handles'."""
    if args.model_dir is not None:
        return str(args.model_dir)
    from apollo_sync.handles import producer_state

    path = producer_state(_rank0_handles(args)).metadata.get("model_path")
    return path if isinstance(path, str) else None


def _record_one_shot(
    args: argparse.Namespace, result: SyncResult | None, error: BaseException | None
) -> None:
    """Adds this sync to --metrics-textfile (the counters it holds go on)."""
    from apollo_sync.errors import TornSyncError
    from apollo_sync.handles import producer_state
    from apollo_sync.metrics import textfile

    label = result.model_dir if result is not None else _model_dir_label(args)
    with textfile(args.metrics_textfile, label) as m:
        if result is not None:
            m.observe(result)
        else:
            m.failed(torn=isinstance(error, TornSyncError))
        m.producer(producer_state(_rank0_handles(args)).alive)


def _cmd_sync(args: argparse.Namespace) -> int:
    from apollo_sync.sync import sync

    if args.metrics_textfile is not None and not args.dry_run:
        try:
            result = _sync_once(args, sync)
        except Exception as e:
            _record_one_shot(args, None, e)
            raise
        _record_one_shot(args, result, None)
    else:
        result = _sync_once(args, sync)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print_result(result)
    return 0


def _sync_once(args: argparse.Namespace, sync: Any) -> SyncResult:
    result: SyncResult = sync(
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
        group=_group(args),
    )
    return result


def _group(args: argparse.Namespace) -> Any:
    """The group of hosts this consumer is one of (None unless --group-size)."""
    if args.group_size is None:
        if args.group_rank is not None or args.group_init is not None:
            raise ValueError("--group-rank and --group-init need --group-size")
        return None
    if args.group_rank is None or args.group_init is None:
        raise ValueError("--group-size needs --group-rank and --group-init")
    from apollo_sync.group import Group

    return Group(args.group_rank, args.group_size, args.group_init, args.group_timeout)


def _cmd_watch(args: argparse.Namespace) -> int:
    import signal
    import threading

    from apollo_sync.metrics import SyncMetrics
    from apollo_sync.watch import watch

    metrics: SyncMetrics | None = None
    stop_server = None
    if args.metrics_port is not None or args.metrics_textfile is not None:
        metrics = SyncMetrics(_model_dir_label(args))
        if args.metrics_textfile is not None:
            metrics.load_textfile(args.metrics_textfile)
        if args.metrics_port is not None:
            stop_server = metrics.serve(args.metrics_port, args.metrics_addr)
            logging.getLogger("apollo_sync.cli").info(
                "serving metrics on http://%s:%d/metrics", args.metrics_addr, args.metrics_port
            )

    def publish() -> None:
        if metrics is not None and args.metrics_textfile is not None:
            metrics.write_textfile(args.metrics_textfile)

    stop, reload = threading.Event(), threading.Event()
    # SIGTERM (a service manager stopping it): finish the sync in progress, then stop;
    # SIGHUP (systemctl reload): open the handles again
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: reload.set())

    def torn(e: Exception) -> None:
        if metrics is not None:
            metrics.failed(torn=True)
            publish()

    def alive(yes: bool) -> None:
        if metrics is not None:
            metrics.producer(yes)

    def report(r: SyncResult) -> None:
        if metrics is not None:
            metrics.observe(r)
            publish()
        if args.json:
            print(json.dumps(r.to_dict()), flush=True)
            return
        if args.log_format == "json":
            return  # each sync is a JSON log record (apollo_sync.sync) already
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

    try:
        summary = watch(
            args.model_dir,
            handles=args.handles,
            interval=args.interval,
            count=args.count,
            stop=stop,
            reload=reload,
            on_sync=report,
            on_torn=torn,
            on_check=alive,
            block_size=args.block_size,
            direct_io=args.direct_io,
            threads=args.threads,
            allow_unmatched=args.allow_unmatched,
            journal=not args.no_journal,
            keep=args.keep,
            undo_budget=args.undo_budget,
            lock_timeout=args.lock_timeout,
            durable=args.durable,
            group=_group(args),
        )
    except Exception:
        if metrics is not None:
            metrics.failed()
            publish()
        raise
    finally:
        if stop_server is not None:
            stop_server()
    if args.json:  # summary.warnings were logged by watch
        print(json.dumps({"stopped": summary.reason, **vars(summary)}), flush=True)
    elif args.log_format != "json":  # else logged by watch
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


def _cmd_status(args: argparse.Namespace) -> int:
    from apollo_sync.errors import HandlesError
    from apollo_sync.handles import producer_state
    from apollo_sync.status import render, status

    model_dir = args.model_dir
    if model_dir is None:
        producer = producer_state(_rank0_handles(args))
        model_dir = producer.metadata.get("model_path")
        if not isinstance(model_dir, str):
            raise HandlesError(f"{producer.detail}; pass --model-dir")
    from apollo_sync.group import read_group

    options = {"handles": _rank0_handles(args), "keep": args.keep, "undo_budget": args.undo_budget}
    if read_group(model_dir) is not None:  # several hosts: one status each
        from apollo_sync.status import group_status, render_group

        gs = group_status(model_dir, **options)
        print(json.dumps(gs.to_dict(), indent=2) if args.json else render_group(gs))
        return 0
    st = status(model_dir, **options)
    print(json.dumps(st.to_dict(), indent=2) if args.json else render(st))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from apollo_sync.report import change_report, heatmap, render

    rep = change_report(args.model_dir, last=args.last)
    if args.png is not None:
        heatmap(rep, args.png)
    if args.json:
        print(json.dumps(rep.to_dict(), indent=2))
    elif args.png is not None:
        print(f"{args.png}: {len(rep.rows)} layer row(s) x {len(rep.generations)} generation(s)")
    else:
        print(render(rep))
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


def _cmd_reshard(args: argparse.Namespace) -> int:
    from apollo_sync.reshard import parse_stages, reshard

    owners = reshard(args.model_dir, parse_stages(args.stages))
    for name, host in sorted(owners.items(), key=lambda x: (x[1], x[0])):
        print(f"host {host}  {name}")
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


def logging_options(p: argparse.ArgumentParser, *, top: bool) -> None:
    """-v / -q / --log-format, accepted before the command and after it."""

    def default(value: object) -> object:
        # after the command, an option overrides the one before it only when given
        return value if top else argparse.SUPPRESS

    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default(0),
        help="log what each sync did and show tracebacks and full listings; -vv: debug",
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="count",
        default=default(0),
        help="log errors only (not warnings)",
    )
    p.add_argument(
        "--log-format",
        choices=logconfig.FORMATS,
        default=default("text"),
        help="how log records go to stderr: text lines, or one JSON object a line for "
        "log shippers (default text)",
    )


#: What a reader of the files may rely on, printed under ``--help``.
READERS_CONTRACT = """\
what readers of the model directory may rely on:
  When a sync returns, the files are current through this host's page cache; they
  reach the disk in the background (--durable waits for it). After a power cut they
  are one whole generation only once `apollo-sync recover` has run: a service that
  loads the model at boot runs it first. A loader or rsync that must see one
  generation reads inside `with apollo_sync.reading(model_dir):` (recovers if needed
  and holds syncs off while it reads). See README.md and docs/FORMAT.md."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="apollo-sync",
        description="Keep a model's safetensors files equal to its live weights, "
        "writing only the blocks that changed.",
        epilog=READERS_CONTRACT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    logging_options(p, top=True)
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
            type=_count,
            default=gens.DEFAULT_KEEP,
            help=f"generations whose logs are kept as rollback points "
            f"(default {gens.DEFAULT_KEEP})",
        )
        sp.add_argument(
            "--undo-budget",
            type=_count,
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

    def grouped(sp: argparse.ArgumentParser) -> None:
        g = sp.add_argument_group(
            "several hosts (pipeline stages on several hosts, one consumer each, committing "
            "each generation together; docs/OPERATIONS.md)"
        )
        g.add_argument("--group-rank", type=int, default=None, help="this host's number, 0..H-1")
        g.add_argument("--group-size", type=int, default=None, help="the number of hosts H")
        g.add_argument(
            "--group-init",
            default=None,
            metavar="tcp://HOST:PORT",
            help="where the hosts meet: host 0's address and a free port",
        )
        g.add_argument(
            "--group-timeout",
            type=float,
            default=300.0,
            help="seconds a host waits for the others (default 300)",
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

    s = sub.add_parser(
        "sync",
        help="write the live weights' changed blocks into the files",
        description="Write the live weights' changed blocks into the files, as one "
        "logged generation.",
        epilog=READERS_CONTRACT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    s.add_argument(
        "--metrics-textfile",
        type=Path,
        default=None,
        help="add this sync to Prometheus metrics in this file, for node_exporter's "
        "textfile collector (the counters it holds go on from run to run)",
    )
    retention(s)
    durability(s)
    lock(s)
    grouped(s)
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
        help="seconds between syncs when the producer has no step counter (default 1; "
        "in a group, host 0's sets when every host syncs)",
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
    w.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics on this port (/metrics)",
    )
    w.add_argument(
        "--metrics-addr",
        default="127.0.0.1",
        help="the address to serve them on (default 127.0.0.1; 0.0.0.0 for every interface)",
    )
    w.add_argument(
        "--metrics-textfile",
        type=Path,
        default=None,
        help="also write the metrics to this file after each sync (node_exporter's "
        "textfile collector)",
    )
    retention(w)
    durability(w)
    lock(w)
    grouped(w)
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

    t = sub.add_parser(
        "status",
        help="one screen: generation, an interrupted sync awaiting recovery, log bytes and "
        "budget, rollback points, the last sync, whether the producer runs",
    )
    source(t)
    t.add_argument("--json", action="store_true", help="print the status as JSON")
    retention(t)
    t.set_defaults(func=_cmd_status)

    e = sub.add_parser(
        "report",
        help="what training changed: the fraction of elements changed per layer and per "
        "tensor kind (attention, MLP, experts, embedding, norms), per generation",
    )
    e.add_argument("--model-dir", type=Path, required=True)
    e.add_argument(
        "--last", type=int, default=None, help="the last N generations (default: all listed)"
    )
    e.add_argument(
        "--png",
        type=Path,
        default=None,
        help="also draw a heatmap (layers x generations, and kinds) into this PNG "
        "(needs matplotlib: pip install 'apollo-sync[report]')",
    )
    e.add_argument("--json", action="store_true", help="print the numbers as JSON")
    e.set_defaults(func=_cmd_report)

    b = sub.add_parser("rollback", help="restore the files to an earlier generation")
    b.add_argument("--model-dir", type=Path, required=True)
    b.add_argument("--to", type=int, required=True, help="the generation to restore")
    lock(b)
    b.set_defaults(func=_cmd_rollback)

    x = sub.add_parser(
        "reshard",
        help="split shards at pipeline stage boundaries, one file per host (before the "
        "first group sync)",
    )
    x.add_argument("--model-dir", type=Path, required=True)
    x.add_argument(
        "--stages",
        required=True,
        metavar="FIRST-LAST,...",
        help="the decoder layers each host holds, in host order, e.g. 0-17,18-35 "
        "(embeddings go with the first, the final norm and head with the last)",
    )
    x.set_defaults(func=_cmd_reshard)

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
    for command in sub.choices.values():
        logging_options(command, top=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logconfig.configure(verbose=args.verbose, quiet=args.quiet, fmt=args.log_format)
    log = logging.getLogger("apollo_sync.cli")
    try:
        code: int = args.func(args)
        return code
    except (ApolloSyncError, ImportError, OSError, TypeError, ValueError) as e:
        msg = str(e).strip() or type(e).__name__
        notes = list(getattr(e, "__notes__", []))
        if args.log_format == "json":
            log.error(
                "%s: %s",
                type(e).__name__,
                msg,
                exc_info=e if args.verbose else None,
                extra={"event": "error", "error": type(e).__name__, "notes": notes},
            )
            return 1
        if args.verbose:
            traceback.print_exc()
        # one line, whatever the level (-q included): the reason the command failed
        print(f"apollo-sync: error: {type(e).__name__}: {msg}", file=sys.stderr)
        for note in notes:
            print(f"apollo-sync: note: {note}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("apollo-sync: interrupted", file=sys.stderr)
        return 130
