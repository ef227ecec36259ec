"""``python3 -m kemari``: the main verbs of the ``kemari`` CLI (docs/cli.md) in Python.

    python3 -m kemari [--socket PATH] [--json] start DOM HOST [options]
    python3 -m kemari status [DOM]
    python3 -m kemari stop|failover|checkpoint DOM
    python3 -m kemari events [DOM] [--count N]

Exit status: 0 success, 1 failure (the message names the guest, the host and the cause, and the
fix), 2 usage error. With --json each result is one JSON object per line on stdout (the daemon's
reply), and a failure is ``{"ok": false, "error": {"code", "message", "fix"}}`` on stdout too.
"""

import argparse
import datetime
import json
import socket
import sys
from typing import List, Optional

from . import errors
from .client import DEFAULT_SOCKET, Client
from .types import Event, GuestStatus, StateEvent, Status


def _add_common(p: argparse.ArgumentParser, top: bool) -> None:
    # On the subcommands the defaults are suppressed so that a value given before the verb
    # is not overwritten by the subcommand's default.
    default = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    p.add_argument("--socket", metavar="PATH", default=default(DEFAULT_SOCKET), help=f"kemarid's control socket (default {DEFAULT_SOCKET})")
    p.add_argument("--json", action="store_true", default=default(False), help="print the daemon's replies as JSON lines")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 -m kemari", description="Client of kemarid, the Kemari for Xen daemon.")
    _add_common(p, True)
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    s = sub.add_parser("start", help="protect a guest of this host with a replica on HOST")
    _add_common(s, False)
    s.add_argument("dom", help="domain name or id on this host")
    s.add_argument("host", help="the secondary's kemarid: HOST or HOST:PORT")
    s.add_argument("--interval-ms", type=int, metavar="MS", help="maximum epoch interval")
    s.add_argument("--min-run-ms", type=int, metavar="MS", help="minimum guest run time between checkpoints")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--suspend", dest="suspend", action="store_const", const=True, help="checkpoints at suspend points")
    g.add_argument("--no-suspend", dest="suspend", action="store_const", const=False, help="checkpoints by toolstack pause")
    s.add_argument("--disk", metavar="PATH", help="the guest's disk image, served with output commit")
    s.add_argument("--disk-copy", metavar="PATH", help="the secondary's copy of the disk")
    s.add_argument("--vdev", help="the disk's virtual device (xvda)")
    s.add_argument("--vif", metavar="SPEC", help="the guest's NIC on the secondary after a failover")
    s.add_argument("--unpause", action="store_const", const=True, help="unpause the guest after the initial sync")
    s.add_argument("--heartbeat-ms", type=int, metavar="MS", help="heartbeat period")
    s.add_argument("--heartbeat-misses", type=int, metavar="N", help="missed heartbeats before the peer is dead")
    s.add_argument("--no-wait", action="store_true", help="return once the workers run, before the initial sync")
    s.add_argument("--timeout", type=float, default=0, metavar="SECS", help="give up waiting after SECS (0: no limit)")

    s = sub.add_parser("stop", help="end the protection of a guest")
    _add_common(s, False)
    s.add_argument("dom")

    s = sub.add_parser("status", help="status of this host's protected guests")
    _add_common(s, False)
    s.add_argument("dom", nargs="?")

    s = sub.add_parser("failover", help="on the secondary: run the guest here now")
    _add_common(s, False)
    s.add_argument("dom")
    s.add_argument("--force", action="store_true", help="even while the primary answers its heartbeat")

    s = sub.add_parser("checkpoint", help="on the primary: take a checkpoint now")
    _add_common(s, False)
    s.add_argument("dom")
    s.add_argument("--wait-ms", type=int, metavar="MS", help="how long to wait for the acknowledgement")

    s = sub.add_parser("events", help="follow kemarid's events")
    _add_common(s, False)
    s.add_argument("dom", nargs="?")
    s.add_argument("--count", type=int, metavar="N", help="exit after N events")
    return p


def _print_json(obj) -> None:
    print(json.dumps(obj, separators=(",", ":")), flush=True)


def _fmt_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "-"
    if ms >= 1000:
        return f"{ms / 1000:.1f}s"
    return f"{ms:.1f}ms" if ms >= 10 else f"{ms:.2f}ms"


def _fmt_rate(b: float) -> str:
    units = ["B/s", "KiB/s", "MiB/s", "GiB/s"]
    i = 0
    while b >= 1024 and i + 1 < len(units):
        b /= 1024
        i += 1
    return f"{b:.0f} {units[i]}" if i == 0 else f"{b:.1f} {units[i]}"


COLUMNS = ["GUEST", "ROLE", "PEER", "STATE", "CKPT/S", "LAST-ACK", "PAUSE p50/p99", "DIRTY/CKPT", "LAG", "LINK", "HEARTBEAT", "DOMID"]


def _row(g: GuestStatus) -> List[str]:
    if g.heartbeat is None:
        hb = "off"
    elif g.heartbeat.last_heard_ms is not None:
        hb = f"{g.heartbeat.peer} ({_fmt_ms(g.heartbeat.last_heard_ms)} ago)"
    else:
        hb = g.heartbeat.peer
    pause = f"{_fmt_ms(g.pause_ms.p50)}/{_fmt_ms(g.pause_ms.p99)}" if g.role == "primary" and g.checkpoints else "-"
    return [
        g.dom,
        g.role,
        g.peer,
        g.state,
        f"{g.checkpoints_per_s:.1f}",
        "-" if g.last_acked_seq is None else str(g.last_acked_seq),
        pause,
        f"{g.dirty_pages_per_checkpoint:.1f}",
        _fmt_ms(g.replication_lag_ms),
        _fmt_rate(g.link_bytes_per_s),
        hb,
        "-" if g.domid is None else str(g.domid),
    ]


def render_status(st: Status) -> str:
    """The status table of the ``kemari status`` CLI."""
    if not st.guests:
        return f"kemarid on {st.host}: no protected guests\n"
    rows = [COLUMNS] + [_row(g) for g in st.guests]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    out = ""
    for r in rows:
        out += "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n"
    for g in st.guests:
        s = g.initial_sync
        if s is not None and not s.done:
            eta = "-" if s.eta_s is None else f"{s.eta_s:.0f}s"
            out += f"{g.dom}: initial sync {100 * s.fraction:.0f}% ({s.pages} of {s.total} pages, {s.rate_pages_per_s:.0f} pages/s, round {s.round}, ETA {eta})\n"
        if g.error:
            out += f"{g.dom}: error: {g.error}\n"
    return out


def render_event(ev: Event) -> str:
    """One event as a line of text."""
    t = datetime.datetime.fromtimestamp(ev.time, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    if isinstance(ev, StateEvent):
        return f"{t} {ev.dom} state {ev.from_state or '(new)'} -> {ev.to}: {ev.reason}"
    d = ev.to_json()
    kind = d.pop("kind")
    for k in ("time", "dom"):
        d.pop(k, None)
    detail = " ".join(f"{k}={v}" for k, v in d.items())
    return f"{t} {ev.dom} {kind} {detail}".rstrip()


def _tty_progress(g: GuestStatus) -> None:
    s = g.initial_sync
    if s is None:
        line = f"{g.dom}: {g.state}"
    else:
        eta = "-" if s.eta_s is None else f"{s.eta_s:.0f}s"
        line = f"initial sync {100 * s.fraction:5.1f}%  {s.pages}/{s.total} pages  {s.rate_pages_per_s:.0f} pages/s  ETA {eta}"
    sys.stdout.write("\r\033[K" + line)
    sys.stdout.flush()


def _run(a, c: Client) -> int:
    host = socket.gethostname()
    if a.verb == "start":
        a.what = f"cannot protect guest {a.dom} of {host} with a replica on {a.host}"
        opts = {
            k: getattr(a, k)
            for k in ("interval_ms", "min_run_ms", "suspend", "disk", "disk_copy", "vdev", "vif", "unpause", "heartbeat_ms", "heartbeat_misses")
        }
        g = c.start(a.dom, a.host, **opts)
        if not a.no_wait:
            tty = not a.json and sys.stdout.isatty()
            try:
                g = c.wait(a.dom, timeout=a.timeout or None, progress=_tty_progress if tty else None)
            finally:
                if tty:
                    sys.stdout.write("\n")
        if a.json:
            _print_json(g.to_json())
        elif g.state == "protected":
            print(f"{g.dom}: protected, replica on {g.peer} ({g.checkpoints} checkpoints, last ACKed sequence {g.last_acked_seq})")
        else:
            print(f"{g.dom}: protection starting, replica on {g.peer} (state {g.state}); follow it with `kemari status {g.dom}`")
    elif a.verb == "stop":
        a.what = f"cannot stop the protection of guest {a.dom} on {host}"
        g = c.stop(a.dom)
        if a.json:
            _print_json(g.to_json())
        else:
            print(f"{g.dom}: protection stopped (role {g.role}, peer {g.peer}, state {g.state})")
    elif a.verb == "status":
        a.what = f"cannot get the status of {'guest ' + a.dom if a.dom else 'the protected guests'} on {host}"
        st = c.status(a.dom)
        if a.json:
            _print_json(st.to_json())
        else:
            sys.stdout.write(render_status(st))
    elif a.verb == "failover":
        a.what = f"cannot fail guest {a.dom} over to {host}"
        g = c.failover(a.dom, force=a.force)
        if a.json:
            _print_json(g.to_json())
        else:
            print(f"{g.dom}: runs on {host} from checkpoint {g.last_acked_seq} (state {g.state}); it is not protected now")
    elif a.verb == "checkpoint":
        a.what = f"cannot take a checkpoint of guest {a.dom} on {host}"
        r = c.checkpoint(a.dom, wait_ms=a.wait_ms)
        if a.json:
            _print_json(r.to_json())
        else:
            print(f"{r.dom}: checkpoint acknowledged, sequence {r.acked_seq}")
    elif a.verb == "events":
        a.what = f"cannot follow the events of {'guest ' + a.dom if a.dom else 'kemarid'} on {host}"
        if a.count is not None and a.count <= 0:
            return 0
        stream = c.events(a.dom)
        try:
            for n, ev in enumerate(stream, 1):
                if a.json:
                    _print_json(ev.to_json())
                else:
                    print(render_event(ev), flush=True)
                if a.count is not None and n >= a.count:
                    break
        finally:
            stream.close()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    a = _parser().parse_args(argv)
    a.what = "kemari"
    c = Client(a.socket)
    try:
        return _run(a, c)
    except errors.KemariError as e:
        if a.json:
            _print_json({"ok": False, "error": {"code": e.code, "message": f"{a.what}: {e.message}", "fix": e.fix}})
        print(f"kemari: {a.what}: {e.message}", file=sys.stderr)
        if e.fix:
            print(f"kemari: fix: {e.fix}", file=sys.stderr)
        return 1
    except TypeError as e:  # a start option of the wrong type
        print(f"kemari: {a.what}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
