"""``fedmae watch`` (a live view of the rounds) and ``fedmae status`` (one snapshot)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import queue
import threading
import time
from typing import Any

from fedmae.admin_view import RunStatus, dp_line
from fedmae.cli.admin import add_connection_args, admin_client
from fedmae.errors import FedmaeError

# The status of a secure round after its training (aggregator_service.secure_rounds).
SECURE_PHASE_LABELS = ("share_keys", "masked_input", "unmask")


def follow_rounds(
    args: argparse.Namespace, out: queue.Queue, stop: threading.Event, from_round: int = 0
) -> None:
    """Put ``(seq, record)`` on ``out`` for every closed round, reconnecting while the
    aggregator restarts; ``None`` when the run has finished, the error on a hard one."""
    try:
        with admin_client(args) as admin:
            for item in admin.watch_rounds(from_round, stop):
                out.put(item)
    except FedmaeError as err:
        out.put(err)
        return
    if not stop.is_set():
        out.put(None)  # the stream ended normally: the run finished


def cmd_watch(args: argparse.Namespace) -> int:
    records: queue.Queue = queue.Queue()
    stop = threading.Event()
    thread = threading.Thread(
        target=follow_rounds, args=(args, records, stop, args.from_round), daemon=True
    )
    thread.start()
    try:
        if args.json:
            return _watch_json(records)
        return _watch_live(args, records)
    except KeyboardInterrupt:
        return 130
    finally:
        stop.set()


def _watch_json(records: queue.Queue) -> int:
    while True:
        item = records.get()
        if item is None:
            return 0
        if isinstance(item, FedmaeError):
            raise item
        print(json.dumps(item[1]), flush=True)


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _rounds_table(rows: list[dict]):
    from rich.table import Table

    table = Table(title="closed rounds", expand=False, header_style="bold")
    private = any(r.get("dp") for r in rows)  # the ε column only under --dp
    for col in ("round", "status", "version", "clients", "samples", "train", "val", "eval",
                "MB in", "MB out", "seconds", *(("ε",) if private else ())):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows[-20:]:
        style = {"published": "", "failed": "red", "aborted": "yellow"}.get(r["status"], "")
        table.add_row(
            f"{r['round']}" + (f".{r['attempt']}" if r["attempt"] > 1 else ""),
            r["status"], str(r["version"]),
            f"{len(r['participants'])}/{len(r['selected'])}", str(r["num_samples"]),
            _fmt(r["train_loss"]), _fmt(r["val_loss"]), _fmt(r.get("eval_loss")),
            f"{r['bytes_in'] / 1e6:.1f}", f"{r['bytes_out'] / 1e6:.1f}", f"{r['duration_s']:.1f}",
            *((_fmt((r.get("dp") or {}).get("epsilon"), ".3g"),) if private else ()),
            style=style,
        )  # fmt: skip
    return table


def _status_panel(status: RunStatus | None, error: str):
    from rich.console import Group
    from rich.panel import Panel
    from rich.progress_bar import ProgressBar
    from rich.text import Text

    if status is None:
        return Panel(Text(error or "connecting...", style="yellow"), title="aggregator")
    target = f"/{status.rounds_target}" if status.rounds_target else ""
    head = Text.assemble(
        ("state ", "dim"), (status.state, "bold"),
        (f" ({status.finish_reason})" if status.finish_reason else "", "bold"),
        ("   round ", "dim"), f"{status.round}{target}",
        ("   version ", "dim"), str(status.version),
        ("   connected ", "dim"), f"{len(status.connected)} (min {status.min_clients})",
    )  # fmt: skip
    parts: list = [head, Text(", ".join(status.connected) or "no clients connected", style="dim")]
    if status.state in ("training", *SECURE_PHASE_LABELS) and status.selected:
        done, total = len(status.reported), len(status.selected)
        parts.append(
            Text.assemble(
                ("updates ", "dim"),
                f"{done}/{total}",
                ("   uploading ", "dim"),
                str(len(status.uploading)),
                ("   elapsed ", "dim"),
                f"{status.round_elapsed_s:.0f}s",
                ("   deadline in ", "dim"),
                f"{status.deadline_in_s:.0f}s",
            )  # fmt: skip
        )
        parts.append(ProgressBar(total=total, completed=done, width=50))
        if status.progress:
            parts.append(Text(_site_progress(status), style="dim"))
    return Panel(Group(*parts), title=f"aggregator {error}".strip())


def _watch_live(args: argparse.Namespace, records: queue.Queue) -> int:
    from rich.console import Group
    from rich.live import Live

    rows: list[dict] = []
    status, error, finished = None, "", False
    with admin_client(args) as admin, Live(refresh_per_second=4, transient=False) as live:
        while not finished:
            while True:
                try:
                    item = records.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    finished = True
                elif isinstance(item, FedmaeError):
                    raise item
                else:
                    rows.append(item[1])
            if finished:
                error = "(run finished)"
            else:
                latest = admin.status_if_reachable(timeout=5)
                if latest is None:
                    error = "(unreachable: reconnecting)"
                else:
                    status, error = latest, ""
            live.update(Group(_status_panel(status, error), _rounds_table(rows)))
            if not finished:
                time.sleep(1.0)
    print(f"\nrun finished: {sum(r['status'] == 'published' for r in rows)} rounds published")
    if rows and (dp := rows[-1].get("dp")):  # under --dp: what the run spent
        print(f"privacy: {dp_line(dp)}")
    return 0


def _site_progress(status: RunStatus) -> str:
    """Each training site's step, e.g. ``a 120/400, b 40/400 (no step for 75s)``."""
    return ", ".join(
        f"{c} {p.step}/{p.total}" + (f" (no step for {p.since_step_s:.0f}s)"
                                     if p.since_step_s >= 30 else "")
        for c, p in sorted(status.progress.items())
    )  # fmt: skip


def cmd_status(args: argparse.Namespace) -> int:
    with admin_client(args) as admin:
        s = admin.status(timeout=10)
    last = s.last_record
    if args.json:
        snap = {
            "state": s.state, "round": s.round, "attempt": s.attempt, "version": s.version,
            "rounds_target": s.rounds_target, "connected": s.connected,
            "selected": s.selected, "reported": s.reported,
            "uploading": s.uploading, "last_round": last,
            "progress": {c: dataclasses.asdict(p) for c, p in s.progress.items()},
            "finish_reason": s.finish_reason,
        }  # fmt: skip
        print(json.dumps(snap))
        return 0
    target = f" of {s.rounds_target}" if s.rounds_target else ""
    print(f"state:     {s.state}" + (f" ({s.finish_reason})" if s.finish_reason else ""))
    print(f"round:     {s.round}{target}" + (f" (attempt {s.attempt})" if s.attempt > 1 else ""))
    print(f"version:   {s.version}")
    print(f"clients:   {len(s.connected)} connected (min {s.min_clients}): "
          f"{', '.join(s.connected) or '-'}")  # fmt: skip
    if s.state == "training":
        print(f"updates:   {len(s.reported)}/{len(s.selected)} received, "
              f"{len(s.uploading)} uploading, deadline in {s.deadline_in_s:.0f}s")  # fmt: skip
        if s.progress:
            print(f"progress:  {_site_progress(s)}")
    elif s.state in SECURE_PHASE_LABELS:  # a secure round's later phase
        print(f"answers:   {len(s.reported)}/{len(s.selected)} sites answered {s.state}, "
              f"deadline in {s.deadline_in_s:.0f}s")  # fmt: skip
    if last:
        print(
            f"last:      round {last['round']} {last['status']}: {len(last['participants'])} "
            f"clients, {last['num_samples']} samples, train {_fmt(last['train_loss'])}, "
            f"val {_fmt(last['val_loss'])}, eval {_fmt(last.get('eval_loss'))}, "
            f"{last['duration_s']:.1f}s"
        )
        if dp := last.get("dp"):  # only under --dp: never an ε the run does not guarantee
            print(f"privacy:   {dp_line(dp)}")
    return 0


def build(sub: argparse._SubParsersAction) -> None:
    w = sub.add_parser("watch", help="live view of the rounds (admin)")
    w.add_argument(
        "--json", action="store_true", help="print each closed round as a JSON line (default off)"
    )
    w.add_argument(
        "--from-round",
        type=int,
        default=0,
        help="replay from this round (0 = all; default %(default)s)",
    )
    add_connection_args(w)
    w.set_defaults(func=cmd_watch)
    st = sub.add_parser("status", help="one snapshot of the run (admin)")
    st.add_argument("--json", action="store_true", help="one JSON object (default off)")
    add_connection_args(st)
    st.set_defaults(func=cmd_status)
