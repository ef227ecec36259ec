"""kemari: a client for kemarid, the Kemari for Xen dom0 daemon (docs/api.md).

    import kemari
    c = kemari.Client()                      # /run/kemari/kemarid.sock (root only)
    c.start("web1", "host2", interval_ms=50)
    c.wait("web1")                           # until the initial sync is acknowledged
    for g in c.status().guests:
        print(g.dom, g.role, g.state, g.last_acked_seq)
    for ev in c.events("web1"):
        print(ev)

Pure Python (standard library only). ``python3 -m kemari`` is a command-line front end with the
main verbs of the ``kemari`` CLI.
"""

from .client import DEFAULT_SOCKET, PROTOCOL_VERSION, START_OPTIONS, Client
from .errors import (
    API_ERRORS,
    AlreadyProtected,
    ApiError,
    BadRequest,
    ConnectionClosed,
    ConnectionFailed,
    DaemonNotRunning,
    Forbidden,
    Internal,
    KemariError,
    NotPrimary,
    NotProtected,
    NotSecondary,
    PeerRefused,
    ProtectionFailed,
    ProtocolError,
    ShuttingDown,
    UnknownDomain,
    UnreachableHost,
    UnsupportedVersion,
    WaitTimeout,
    WrongState,
)
from .types import (
    FINAL_STATES,
    STATES,
    AdoptedEvent,
    CheckpointResult,
    CheckpointsEvent,
    Event,
    FailedOverEvent,
    GuestStatus,
    Heartbeat,
    HeartbeatEvent,
    Hello,
    InitialSync,
    InitialSyncEvent,
    Quantiles,
    StateEvent,
    Status,
    UnknownEvent,
    WorkerExitEvent,
)

__version__ = "0.1.0"

__all__ = [name for name in dir() if not name.startswith("_")]
