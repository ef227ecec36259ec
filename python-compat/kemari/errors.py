"""Exceptions of the kemari client.

Every error the daemon returns (docs/api.md, "Errors") is raised as the subclass of
:class:`ApiError` for its code, carrying the daemon's ``message`` (what failed, naming the guest,
the host and the cause) and ``fix`` (what to do about it; also available as ``hint``). The
client's own failures (daemon not running, connection lost, a reply it cannot read) have their own
classes. All derive from :class:`KemariError`.
"""

from typing import Dict, Optional, Type


class KemariError(Exception):
    """Base class of every error of this package."""

    #: Machine-readable code: the daemon's error code, or one of the client's own
    #: (``daemon-not-running``, ``connection-closed``, ``connection-error``, ``protocol-error``,
    #: ``protection-failed``, ``timeout``).
    code = "error"

    def __init__(self, message: str, fix: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.fix = fix

    @property
    def hint(self) -> Optional[str]:
        """The suggested fix (alias of ``fix``)."""
        return self.fix

    def __str__(self) -> str:
        if self.fix:
            return f"{self.message} (fix: {self.fix})"
        return self.message

    def to_dict(self) -> dict:
        """The error as the daemon's JSON error object."""
        d = {"code": self.code, "message": self.message}
        if self.fix is not None:
            d["fix"] = self.fix
        return d


# --- the client's own errors -------------------------------------------------------------


class DaemonNotRunning(KemariError):
    """The control socket cannot be connected to (kemarid not running, wrong path, or no
    permission: the socket is root's only)."""

    code = "daemon-not-running"


class ConnectionClosed(KemariError):
    """kemarid closed the connection without an answer, or ended an event stream."""

    code = "connection-closed"


class ConnectionFailed(KemariError):
    """Reading or writing the connection failed (including a timeout)."""

    code = "connection-error"


class ProtocolError(KemariError):
    """kemarid sent something this client cannot read (another protocol version, bad JSON,
    an unexpected reply)."""

    code = "protocol-error"


class ProtectionFailed(KemariError):
    """:meth:`kemari.Client.wait` saw protection end before the awaited state."""

    code = "protection-failed"


class WaitTimeout(KemariError):
    """:meth:`kemari.Client.wait` gave up (protection goes on in the daemon)."""

    code = "timeout"


# --- errors returned by the daemon --------------------------------------------------------


class ApiError(KemariError):
    """An error the daemon returned. ``code`` is its error code."""

    code = "unknown"


class UnknownDomain(ApiError):
    """No such domain on this host (start), or no guest of that name in the daemon."""

    code = "unknown-domain"


class UnreachableHost(ApiError):
    """The peer host's kemarid cannot be reached."""

    code = "unreachable-host"


class AlreadyProtected(ApiError):
    """The guest is already protected here, or the peer already holds a replica of it."""

    code = "already-protected"


class NotProtected(ApiError):
    """The guest is known but its protection is over."""

    code = "not-protected"


class NotSecondary(ApiError):
    """The request needs the secondary (``failover`` on the primary)."""

    code = "not-secondary"


class NotPrimary(ApiError):
    """The request needs the primary (``checkpoint`` on the secondary)."""

    code = "not-primary"


class WrongState(ApiError):
    """The request does not fit the guest's state."""

    code = "wrong-state"


class PeerRefused(ApiError):
    """The peer daemon refused to receive the guest."""

    code = "peer-refused"


class BadRequest(ApiError):
    """The daemon could not read the request."""

    code = "bad-request"


class UnsupportedVersion(ApiError):
    """The daemon does not speak this client's protocol version."""

    code = "unsupported-version"


class Forbidden(ApiError):
    """A local request sent to a daemon's peer port."""

    code = "forbidden"


class ShuttingDown(ApiError):
    """The daemon is stopping."""

    code = "shutting-down"


class Internal(ApiError):
    """A failure inside the daemon (its message says which)."""

    code = "internal"


#: Error code -> exception class, for every code of protocol version 1.
API_ERRORS: Dict[str, Type[ApiError]] = {
    cls.code: cls
    for cls in (
        UnknownDomain,
        UnreachableHost,
        AlreadyProtected,
        NotProtected,
        NotSecondary,
        NotPrimary,
        WrongState,
        PeerRefused,
        BadRequest,
        UnsupportedVersion,
        Forbidden,
        ShuttingDown,
        Internal,
    )
}


def api_error(obj) -> ApiError:
    """The exception for a daemon's error object ``{"code", "message", "fix"?}``. A code this
    client does not know gives a plain :class:`ApiError` whose ``code`` is the daemon's."""
    if not isinstance(obj, dict) or not isinstance(obj.get("message"), str):
        raise ProtocolError(f"kemarid sent a malformed error object: {obj!r}")
    code = obj.get("code")
    fix = obj.get("fix")
    if fix is not None and not isinstance(fix, str):
        fix = str(fix)
    cls = API_ERRORS.get(code)
    if cls is not None:
        return cls(obj["message"], fix)
    err = ApiError(obj["message"], fix)
    err.code = str(code)
    return err
