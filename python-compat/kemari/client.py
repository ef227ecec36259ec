"""The client of kemarid's control socket (docs/api.md): newline-delimited JSON, protocol 1."""

import json
import socket
import time
from typing import Iterator, Optional

from . import errors
from .types import CheckpointResult, Event, GuestStatus, Hello, Status

#: Where kemarid listens unless configured otherwise.
DEFAULT_SOCKET = "/run/kemari/kemarid.sock"

#: The protocol version this client speaks.
PROTOCOL_VERSION = 1

#: Longest line accepted from the daemon (bytes), as the daemon's own limit.
MAX_LINE = 1 << 20

#: The options of ``start`` (docs/api.md, "start options") and their types.
START_OPTIONS = {
    "interval_ms": int,
    "min_run_ms": int,
    "suspend": bool,
    "disk": str,
    "disk_copy": str,
    "vdev": str,
    "vif": str,
    "unpause": bool,
    "heartbeat_ms": int,
    "heartbeat_misses": int,
}


def _check_options(opts: dict) -> dict:
    """Validates ``start`` options before anything is sent (nothing half-applied)."""
    out = {}
    for k, v in opts.items():
        if v is None:
            continue
        t = START_OPTIONS.get(k)
        if t is None:
            raise TypeError(f"start() got an unknown option {k!r} (known: {', '.join(sorted(START_OPTIONS))})")
        if t is str and hasattr(v, "__fspath__"):
            v = str(v)
        if not isinstance(v, t) or (t is int and isinstance(v, bool)):
            raise TypeError(f"start() option {k}={v!r} must be {t.__name__}")
        if t is int and v < 0:
            raise ValueError(f"start() option {k}={v} must not be negative")
        out[k] = v
    return out


class _Connection:
    """One connection to the daemon: request lines out, response/event lines in."""

    def __init__(self, path: str, timeout: Optional[float]):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            if isinstance(e, PermissionError):
                raise errors.DaemonNotRunning(
                    f"permission denied on kemarid's control socket {path} on {socket.gethostname()}",
                    "the control socket is root's only: run as root",
                ) from e
            raise errors.DaemonNotRunning(
                f"kemarid is not running on {socket.gethostname()}: cannot connect to {path} ({e.strerror or e})",
                "start it with `systemctl start kemarid` (or run `kemarid` as root); if it listens "
                f"elsewhere, pass its socket (default {DEFAULT_SOCKET})",
            ) from e
        self.reader = self.sock.makefile("rb")
        self.next_id = 1

    def close(self) -> None:
        try:
            self.reader.close()
        finally:
            self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _io_error(self, e: OSError) -> errors.KemariError:
        if isinstance(e, socket.timeout):
            return errors.ConnectionFailed(
                f"kemarid at {self.path} did not answer in time",
                "kemarid may be overloaded or stuck: see its log",
            )
        return errors.ConnectionFailed(
            f"talking to kemarid at {self.path}: {e}", "kemarid may have stopped: see its log"
        )

    def send(self, op: str, **fields) -> int:
        rid = self.next_id
        self.next_id += 1
        req = {"v": PROTOCOL_VERSION, "id": rid, "op": op}
        req.update({k: v for k, v in fields.items() if v is not None})
        data = (json.dumps(req, separators=(",", ":")) + "\n").encode()
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise self._io_error(e) from e
        return rid

    def read_line(self) -> Optional[dict]:
        """The next line as a JSON object; None at the end of the stream."""
        try:
            raw = self.reader.readline(MAX_LINE + 1)
        except OSError as e:
            raise self._io_error(e) from e
        if not raw:
            return None
        if len(raw) > MAX_LINE and not raw.endswith(b"\n"):
            raise errors.ProtocolError(f"kemarid at {self.path} sent a line longer than {MAX_LINE} bytes")
        try:
            obj = json.loads(raw)
        except ValueError as e:
            raise errors.ProtocolError(f"kemarid at {self.path} sent a line that is not JSON ({e}): {raw[:200]!r}") from e
        if not isinstance(obj, dict):
            raise errors.ProtocolError(f"kemarid at {self.path} sent a line that is not an object: {raw[:200]!r}")
        if obj.get("v") != PROTOCOL_VERSION:
            raise errors.ProtocolError(
                f"kemarid at {self.path} speaks protocol version {obj.get('v')!r}, this client {PROTOCOL_VERSION}",
                "use a client of the same release as kemarid",
            )
        return obj

    def call(self, op: str, expect: str, **fields) -> dict:
        """Sends a request, returns the reply's result (whose ``type`` must be ``expect``) or
        raises the daemon's error."""
        rid = self.send(op, **fields)
        resp = self.read_line()
        if resp is None:
            raise errors.ConnectionClosed(
                f"kemarid at {self.path} closed the connection without answering {op}",
                "kemarid may have stopped or crashed: see its log",
            )
        if resp.get("id") not in (None, rid):
            raise errors.ProtocolError(f"kemarid answered request {resp.get('id')} instead of {rid}")
        if resp.get("ok") is True:
            result = resp.get("result")
            if not isinstance(result, dict) or result.get("type") != expect:
                raise errors.ProtocolError(f"kemarid answered {op} with an unexpected reply: {resp!r}")
            return result
        if resp.get("ok") is False:
            raise errors.api_error(resp.get("error"))
        raise errors.ProtocolError(f"kemarid's response has no ok field: {resp!r}")


class Client:
    """A client of one kemarid.

    Each call opens its own connection to ``socket_path``, so a client can be shared between
    threads. ``timeout`` (seconds, None: no limit) bounds each call's connect, send and wait for
    the answer; it does not apply to :meth:`events`, which waits for events as long as it takes.

    Errors: :class:`kemari.DaemonNotRunning` and the other client errors, or the
    :class:`kemari.ApiError` subclass of the daemon's error code.
    """

    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout: Optional[float] = 30.0):
        self.socket_path = str(socket_path)
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"Client(socket_path={self.socket_path!r})"

    def _call(self, op: str, expect: str, timeout: Optional[float] = None, **fields) -> dict:
        with _Connection(self.socket_path, self.timeout if timeout is None else timeout) as c:
            return c.call(op, expect, **fields)

    def hello(self) -> Hello:
        """Who the daemon is: version, protocols, host name, mode (xen / mem), pid."""
        return Hello.from_json(self._call("hello", "hello"))

    def status(self, dom: Optional[str] = None) -> Status:
        """Status of all guests of this daemon, or of ``dom`` only (:class:`kemari.UnknownDomain`
        if the daemon has no such guest)."""
        return Status.from_json(self._call("status", "status", dom=dom))

    def guest(self, dom: str) -> GuestStatus:
        """Status of one guest."""
        st = self.status(dom)
        g = st.guest(dom)
        if g is None:
            raise errors.UnknownDomain(f"kemarid on {st.host} has no guest {dom}", "check `kemari status`")
        return g

    def start(self, dom: str, host: str, **options) -> GuestStatus:
        """Protect domain ``dom`` of this host with a replica on ``host`` (``HOST`` or
        ``HOST:PORT`` of its kemarid). ``options`` are those of docs/api.md (``interval_ms``,
        ``min_run_ms``, ``suspend``, ``disk``, ``disk_copy``, ``vdev``, ``vif``, ``unpause``, ``heartbeat_ms``,
        ``heartbeat_misses``); an unknown or mistyped one raises TypeError
        before anything is sent. Returns once the workers run (state ``starting``): use
        :meth:`wait` for the initial sync."""
        opts = _check_options(options)
        return GuestStatus.from_json(self._call("start", "guest", dom=dom, host=host, options=opts))

    def stop(self, dom: str) -> GuestStatus:
        """End the protection of ``dom`` (primary: the guest runs on unprotected; secondary:
        the replica is dropped)."""
        return GuestStatus.from_json(self._call("stop", "guest", dom=dom))

    def failover(self, dom: str, force: bool = False) -> GuestStatus:
        """On the secondary: run ``dom`` here now from the last acknowledged checkpoint.
        ``force`` even while the primary answers its heartbeat (two copies would run)."""
        return GuestStatus.from_json(self._call("failover", "guest", dom=dom, force=force or None))

    def checkpoint(self, dom: str, wait_ms: Optional[int] = None) -> CheckpointResult:
        """On the primary: take a checkpoint now; returns the sequence number acknowledged
        after the request."""
        timeout = None
        if wait_ms is not None and self.timeout is not None:
            timeout = max(self.timeout, wait_ms / 1000 + 5)
        return CheckpointResult.from_json(self._call("checkpoint", "checkpoint", timeout=timeout, dom=dom, wait_ms=wait_ms))

    def events(self, dom: Optional[str] = None) -> Iterator[Event]:
        """Follow the events of ``dom`` (or of all guests): a generator of
        :class:`kemari.Event` that waits for each. It raises
        :class:`kemari.ConnectionClosed` when the daemon ends the stream (it stopped, or this
        reader was too slow); closing the generator closes the connection.

        The subscription is made when the generator is first advanced."""
        conn = _Connection(self.socket_path, self.timeout)
        try:
            conn.call("events", "subscribed", dom=dom)
            conn.sock.settimeout(None)
            while True:
                line = conn.read_line()
                if line is None:
                    raise errors.ConnectionClosed(
                        f"kemarid at {self.socket_path} ended the event stream",
                        "kemarid stopped, or dropped this subscriber for reading too slowly: see its log",
                    )
                yield Event.from_json(line.get("event"))
        finally:
            conn.close()

    def wait(
        self,
        dom: str,
        state: str = "protected",
        timeout: Optional[float] = None,
        interval: float = 0.2,
        progress=None,
    ) -> GuestStatus:
        """Poll ``dom``'s status until it reaches ``state``. Raises
        :class:`kemari.ProtectionFailed` if protection ends first (in another final state) and
        :class:`kemari.WaitTimeout` after ``timeout`` seconds. ``progress`` is called with each
        status seen."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            g = self.guest(dom)
            if progress is not None:
                progress(g)
            if g.state == state:
                return g
            if g.is_final:
                cause = g.error or f"protection ended in state {g.state}"
                raise errors.ProtectionFailed(
                    f"guest {dom} (peer {g.peer}) did not reach {state}: {cause}",
                    "see kemarid's log on both hosts",
                )
            if deadline is not None and time.monotonic() >= deadline:
                raise errors.WaitTimeout(
                    f"guest {dom} (peer {g.peer}) is in state {g.state}, not {state}, after {timeout} s",
                    f"follow it with `kemari status {dom}`",
                )
            time.sleep(interval)
