"""Typed results of the control API (docs/api.md, "Replies" and "Events").

Each class is a dataclass built from the daemon's JSON by ``from_json``; fields the daemon adds in
a later release are ignored, a missing or mistyped field raises :class:`kemari.ProtocolError`.
``to_json`` gives back the daemon's JSON form (for ``--json`` output).
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional

from .errors import ProtocolError

#: The guest states of protocol version 1.
STATES = (
    "starting",
    "initial-sync",
    "protected",
    "stopping",
    "stopped",
    "failed",
    "failing-over",
    "failed-over",
)

#: States after which no worker runs: protection is over.
FINAL_STATES = ("stopped", "failed", "failed-over")

_TYPES = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
}


def _get(d: dict, key: str, kind: str, where: str, optional: bool = False):
    if key not in d or d[key] is None:
        if optional:
            return None
        raise ProtocolError(f"kemarid's {where} lacks the field {key!r}: {d!r}")
    v = d[key]
    ok = isinstance(v, _TYPES[kind]) and not (kind in ("int", "float") and isinstance(v, bool))
    if not ok:
        raise ProtocolError(f"kemarid's {where} has {key}={v!r}, expected {kind}")
    return float(v) if kind == "float" else v


def _obj(v: Any, where: str) -> dict:
    if not isinstance(v, dict):
        raise ProtocolError(f"kemarid sent {where} that is not an object: {v!r}")
    return v


def _to_json(obj) -> dict:
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if v is None:
            continue
        if dataclasses.is_dataclass(v):
            v = _to_json(v)
        elif isinstance(v, list):
            v = [_to_json(x) if dataclasses.is_dataclass(x) else x for x in v]
        out[f.name] = v
    return out


@dataclass(frozen=True)
class Quantiles:
    """Median, 99th percentile and maximum of a time (ms)."""

    p50: float
    p99: float
    max: float

    @classmethod
    def from_json(cls, d) -> "Quantiles":
        d = _obj(d, "quantiles")
        return cls(*(_get(d, k, "float", "quantiles") for k in ("p50", "p99", "max")))


@dataclass(frozen=True)
class Heartbeat:
    """The heartbeat as seen by this side."""

    period_ms: int
    misses_allowed: int
    peer: str  # alive / dead / unknown
    misses: int
    last_heard_ms: Optional[float] = None

    @classmethod
    def from_json(cls, d) -> "Heartbeat":
        d = _obj(d, "heartbeat")
        w = "heartbeat"
        return cls(
            period_ms=_get(d, "period_ms", "int", w),
            misses_allowed=_get(d, "misses_allowed", "int", w),
            peer=_get(d, "peer", "str", w),
            misses=_get(d, "misses", "int", w),
            last_heard_ms=_get(d, "last_heard_ms", "float", w, optional=True),
        )


@dataclass(frozen=True)
class InitialSync:
    """Progress of the initial copy."""

    pages: int
    total: int
    rate_pages_per_s: float
    round: int
    done: bool
    eta_s: Optional[float] = None

    @property
    def fraction(self) -> float:
        """Share of the first round copied, 0.0 to 1.0."""
        return min(self.pages, self.total) / self.total if self.total else 0.0

    @classmethod
    def from_json(cls, d) -> "InitialSync":
        d = _obj(d, "initial_sync")
        w = "initial_sync"
        return cls(
            pages=_get(d, "pages", "int", w),
            total=_get(d, "total", "int", w),
            rate_pages_per_s=_get(d, "rate_pages_per_s", "float", w),
            round=_get(d, "round", "int", w),
            done=_get(d, "done", "bool", w),
            eta_s=_get(d, "eta_s", "float", w, optional=True),
        )


@dataclass(frozen=True)
class GuestStatus:
    """One guest's protection, as this host's daemon sees it (docs/api.md, "Guest status")."""

    dom: str
    role: str  # primary / secondary
    peer: str
    state: str
    since: float
    checkpoints: int
    checkpoints_per_s: float
    pause_ms: Quantiles
    checkpoint_ms: Quantiles
    dirty_pages_per_checkpoint: float
    link_bytes_per_s: float
    bytes: int
    domid: Optional[int] = None
    worker_pid: Optional[int] = None
    last_acked_seq: Optional[int] = None
    replication_lag_ms: Optional[float] = None
    heartbeat: Optional[Heartbeat] = None
    initial_sync: Optional[InitialSync] = None
    error: Optional[str] = None

    @property
    def is_final(self) -> bool:
        """Protection is over (stopped, failed, failed-over)."""
        return self.state in FINAL_STATES

    @classmethod
    def from_json(cls, d) -> "GuestStatus":
        d = _obj(d, "guest status")
        w = "guest status"
        hb = d.get("heartbeat")
        sync = d.get("initial_sync")
        return cls(
            dom=_get(d, "dom", "str", w),
            role=_get(d, "role", "str", w),
            peer=_get(d, "peer", "str", w),
            state=_get(d, "state", "str", w),
            since=_get(d, "since", "float", w),
            checkpoints=_get(d, "checkpoints", "int", w),
            checkpoints_per_s=_get(d, "checkpoints_per_s", "float", w),
            pause_ms=Quantiles.from_json(d.get("pause_ms")),
            checkpoint_ms=Quantiles.from_json(d.get("checkpoint_ms")),
            dirty_pages_per_checkpoint=_get(d, "dirty_pages_per_checkpoint", "float", w),
            link_bytes_per_s=_get(d, "link_bytes_per_s", "float", w),
            bytes=_get(d, "bytes", "int", w),
            domid=_get(d, "domid", "int", w, optional=True),
            worker_pid=_get(d, "worker_pid", "int", w, optional=True),
            last_acked_seq=_get(d, "last_acked_seq", "int", w, optional=True),
            replication_lag_ms=_get(d, "replication_lag_ms", "float", w, optional=True),
            heartbeat=None if hb is None else Heartbeat.from_json(hb),
            initial_sync=None if sync is None else InitialSync.from_json(sync),
            error=_get(d, "error", "str", w, optional=True),
        )

    def to_json(self) -> dict:
        return _to_json(self)


@dataclass(frozen=True)
class Status:
    """Answer to ``status``: this host's name and its guests."""

    host: str
    guests: List[GuestStatus]

    def guest(self, dom: str) -> Optional[GuestStatus]:
        """The guest named ``dom``, if this daemon has it."""
        return next((g for g in self.guests if g.dom == dom), None)

    @classmethod
    def from_json(cls, d) -> "Status":
        d = _obj(d, "status")
        guests = d.get("guests")
        if not isinstance(guests, list):
            raise ProtocolError(f"kemarid's status has no list of guests: {d!r}")
        return cls(host=_get(d, "host", "str", "status"), guests=[GuestStatus.from_json(g) for g in guests])

    def to_json(self) -> dict:
        return {"type": "status", **_to_json(self)}


@dataclass(frozen=True)
class Hello:
    """Answer to ``hello``: who the daemon is."""

    daemon: str
    protocols: List[int]
    host: str
    mode: str  # xen / mem
    pid: int
    peer_listen: Optional[str] = None
    metrics_listen: Optional[str] = None

    @classmethod
    def from_json(cls, d) -> "Hello":
        d = _obj(d, "hello")
        protocols = d.get("protocols")
        if not isinstance(protocols, list) or not all(isinstance(p, int) for p in protocols):
            raise ProtocolError(f"kemarid's hello has no list of protocol versions: {d!r}")
        return cls(
            daemon=_get(d, "daemon", "str", "hello"),
            protocols=protocols,
            host=_get(d, "host", "str", "hello"),
            mode=_get(d, "mode", "str", "hello"),
            pid=_get(d, "pid", "int", "hello"),
            peer_listen=_get(d, "peer_listen", "str", "hello", optional=True),
            metrics_listen=_get(d, "metrics_listen", "str", "hello", optional=True),
        )

    def to_json(self) -> dict:
        return {"type": "hello", **_to_json(self)}


@dataclass(frozen=True)
class CheckpointResult:
    """Answer to ``checkpoint``: the sequence number acknowledged after the request."""

    dom: str
    acked_seq: int

    @classmethod
    def from_json(cls, d) -> "CheckpointResult":
        d = _obj(d, "checkpoint reply")
        return cls(
            dom=_get(d, "dom", "str", "checkpoint reply"),
            acked_seq=_get(d, "acked_seq", "int", "checkpoint reply"),
        )

    def to_json(self) -> dict:
        return {"type": "checkpoint", **_to_json(self)}


# --- events ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """An event: when (Unix time, s), which guest, what kind. Each kind of protocol version 1
    has its subclass; a kind this client does not know comes as :class:`UnknownEvent`."""

    time: float
    dom: str
    kind: ClassVar[str] = ""

    @staticmethod
    def from_json(d) -> "Event":
        d = _obj(d, "event")
        time = _get(d, "time", "float", "event")
        dom = _get(d, "dom", "str", "event")
        kind = _get(d, "kind", "str", "event")
        cls = EVENT_KINDS.get(kind)
        if cls is None:
            return UnknownEvent(time, dom, kind_name=kind, fields={k: v for k, v in d.items() if k not in ("time", "dom", "kind")})
        return cls._parse(time, dom, d)

    def to_json(self) -> dict:
        d = _to_json(self)
        return {"time": d.pop("time"), "dom": d.pop("dom"), "kind": self.kind, **d}


@dataclass(frozen=True)
class StateEvent(Event):
    """The guest's protection changed state (``from_state`` is None for a new guest)."""

    to: str = ""
    reason: str = ""
    from_state: Optional[str] = None
    kind: ClassVar[str] = "state"

    @classmethod
    def _parse(cls, time, dom, d):
        w = "state event"
        return cls(
            time,
            dom,
            to=_get(d, "to", "str", w),
            reason=_get(d, "reason", "str", w),
            from_state=_get(d, "from", "str", w, optional=True),
        )

    def to_json(self) -> dict:
        d = {"time": self.time, "dom": self.dom, "kind": self.kind}
        if self.from_state is not None:
            d["from"] = self.from_state
        d.update(to=self.to, reason=self.reason)
        return d


@dataclass(frozen=True)
class InitialSyncEvent(Event):
    """Progress of the initial copy (at most one a second)."""

    pages: int = 0
    total: int = 0
    rate_pages_per_s: float = 0.0
    kind: ClassVar[str] = "initial-sync"

    @classmethod
    def _parse(cls, time, dom, d):
        w = "initial-sync event"
        return cls(
            time,
            dom,
            pages=_get(d, "pages", "int", w),
            total=_get(d, "total", "int", w),
            rate_pages_per_s=_get(d, "rate_pages_per_s", "float", w),
        )


@dataclass(frozen=True)
class CheckpointsEvent(Event):
    """New acknowledged checkpoints (at most one event a second)."""

    last_acked_seq: int = 0
    checkpoints: int = 0
    per_s: float = 0.0
    kind: ClassVar[str] = "checkpoints"

    @classmethod
    def _parse(cls, time, dom, d):
        w = "checkpoints event"
        return cls(
            time,
            dom,
            last_acked_seq=_get(d, "last_acked_seq", "int", w),
            checkpoints=_get(d, "checkpoints", "int", w),
            per_s=_get(d, "per_s", "float", w),
        )


@dataclass(frozen=True)
class HeartbeatEvent(Event):
    """The peer's heartbeat changed (``peer``: alive / dead)."""

    peer: str = ""
    kind: ClassVar[str] = "heartbeat"

    @classmethod
    def _parse(cls, time, dom, d):
        return cls(time, dom, peer=_get(d, "peer", "str", "heartbeat event"))


@dataclass(frozen=True)
class FailedOverEvent(Event):
    """The guest runs on this host now, from checkpoint ``seq``."""

    domid: Optional[int] = None
    seq: Optional[int] = None
    kind: ClassVar[str] = "failed-over"

    @classmethod
    def _parse(cls, time, dom, d):
        w = "failed-over event"
        return cls(
            time,
            dom,
            domid=_get(d, "domid", "int", w, optional=True),
            seq=_get(d, "seq", "int", w, optional=True),
        )


@dataclass(frozen=True)
class WorkerExitEvent(Event):
    """A worker process ended (``code`` None: killed by a signal)."""

    pid: int = 0
    code: Optional[int] = None
    kind: ClassVar[str] = "worker-exit"

    @classmethod
    def _parse(cls, time, dom, d):
        w = "worker-exit event"
        return cls(time, dom, pid=_get(d, "pid", "int", w), code=_get(d, "code", "int", w, optional=True))


@dataclass(frozen=True)
class AdoptedEvent(Event):
    """A restarted daemon adopted this guest's running worker."""

    pid: int = 0
    kind: ClassVar[str] = "adopted"

    @classmethod
    def _parse(cls, time, dom, d):
        return cls(time, dom, pid=_get(d, "pid", "int", "adopted event"))


@dataclass(frozen=True)
class UnknownEvent(Event):
    """An event of a kind this client does not know (from a newer daemon)."""

    kind_name: str = ""
    fields: Dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"time": self.time, "dom": self.dom, "kind": self.kind_name, **self.fields}


EVENT_KINDS = {
    cls.kind: cls
    for cls in (
        StateEvent,
        InitialSyncEvent,
        CheckpointsEvent,
        HeartbeatEvent,
        FailedOverEvent,
        WorkerExitEvent,
        AdoptedEvent,
    )
}
