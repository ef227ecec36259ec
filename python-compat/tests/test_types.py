"""The client's parsing, errors and option checks, without a daemon (a scripted socket server
stands in where a connection is needed)."""

import json
import socket
import threading

import pytest

import kemari
from kemari import types

GUEST = {
    "dom": "web1",
    "domid": 3,
    "role": "primary",
    "peer": "host2",
    "state": "protected",
    "since": 1764558000.5,
    "checkpoints": 10,
    "checkpoints_per_s": 9.5,
    "last_acked_seq": 11,
    "pause_ms": {"p50": 0.5, "p99": 2, "max": 3.25},
    "checkpoint_ms": {"p50": 1, "p99": 4, "max": 5},
    "dirty_pages_per_checkpoint": 12.5,
    "replication_lag_ms": 40.0,
    "link_bytes_per_s": 1048576.0,
    "bytes": 123456,
    "heartbeat": {"period_ms": 100, "misses_allowed": 5, "peer": "alive", "last_heard_ms": 20.0, "misses": 0},
    "initial_sync": {"pages": 256, "total": 256, "rate_pages_per_s": 1000.0, "round": 2, "done": True},
    "a_field_from_a_newer_daemon": [1, 2],
}


def test_guest_status_parses_every_field_and_round_trips():
    g = kemari.GuestStatus.from_json(GUEST)
    assert g.dom == "web1" and g.domid == 3 and g.role == "primary" and g.state == "protected"
    assert g.pause_ms == kemari.Quantiles(0.5, 2.0, 3.25)
    assert isinstance(g.pause_ms.p99, float)
    assert g.heartbeat.peer == "alive" and g.heartbeat.last_heard_ms == 20.0
    assert g.initial_sync.done and g.initial_sync.fraction == 1.0 and g.initial_sync.eta_s is None
    assert not g.is_final
    back = g.to_json()
    expected = {k: v for k, v in GUEST.items() if k != "a_field_from_a_newer_daemon"}
    assert json.loads(json.dumps(back)) == json.loads(json.dumps(expected))


def test_missing_or_mistyped_fields_are_protocol_errors():
    d = dict(GUEST)
    del d["state"]
    with pytest.raises(kemari.ProtocolError, match="'state'"):
        kemari.GuestStatus.from_json(d)
    d = dict(GUEST, checkpoints="ten")
    with pytest.raises(kemari.ProtocolError, match="checkpoints='ten'"):
        kemari.GuestStatus.from_json(d)
    d = dict(GUEST, checkpoints=True)  # a bool is not a count
    with pytest.raises(kemari.ProtocolError):
        kemari.GuestStatus.from_json(d)
    with pytest.raises(kemari.ProtocolError):
        kemari.Status.from_json({"host": "h", "guests": "none"})


def test_events_are_typed_by_kind():
    e = kemari.Event.from_json({"time": 1.5, "dom": "web1", "kind": "state", "from": "initial-sync", "to": "protected", "reason": "r"})
    assert isinstance(e, kemari.StateEvent)
    assert (e.from_state, e.to, e.reason) == ("initial-sync", "protected", "r")
    assert e.to_json() == {"time": 1.5, "dom": "web1", "kind": "state", "from": "initial-sync", "to": "protected", "reason": "r"}
    e = kemari.Event.from_json({"time": 2, "dom": "d", "kind": "worker-exit", "pid": 7})
    assert isinstance(e, kemari.WorkerExitEvent) and e.pid == 7 and e.code is None
    e = kemari.Event.from_json({"time": 2, "dom": "d", "kind": "checkpoints", "last_acked_seq": 9, "checkpoints": 8, "per_s": 10})
    assert isinstance(e, kemari.CheckpointsEvent) and e.last_acked_seq == 9 and e.per_s == 10.0
    e = kemari.Event.from_json({"time": 2, "dom": "d", "kind": "from-the-future", "x": 1})
    assert isinstance(e, kemari.UnknownEvent) and e.kind_name == "from-the-future"
    assert e.to_json() == {"time": 2.0, "dom": "d", "kind": "from-the-future", "x": 1}
    with pytest.raises(kemari.ProtocolError):
        kemari.Event.from_json({"time": 2, "dom": "d", "kind": "heartbeat"})


def test_every_api_error_code_has_its_class():
    codes = [
        "unknown-domain", "unreachable-host", "already-protected", "not-protected", "not-secondary",
        "not-primary", "wrong-state", "peer-refused", "bad-request", "unsupported-version",
        "forbidden", "shutting-down", "internal",
    ]
    assert sorted(kemari.API_ERRORS) == sorted(codes)
    for code in codes:
        e = kemari.errors.api_error({"code": code, "message": f"m {code}", "fix": "f"})
        assert type(e) is kemari.API_ERRORS[code]
        assert isinstance(e, kemari.ApiError) and isinstance(e, kemari.KemariError)
        assert (e.code, e.message, e.fix, e.hint) == (code, f"m {code}", "f", "f")
        assert str(e) == f"m {code} (fix: f)"
    e = kemari.errors.api_error({"code": "new-code", "message": "m"})
    assert type(e) is kemari.ApiError and e.code == "new-code" and e.fix is None and str(e) == "m"
    with pytest.raises(kemari.ProtocolError):
        kemari.errors.api_error({"code": "internal"})


def test_start_options_are_checked_before_anything_is_sent(absent_socket):
    c = kemari.Client(absent_socket)
    # The socket does not exist: a checked option would give DaemonNotRunning, so TypeError
    # and ValueError prove nothing was attempted.
    with pytest.raises(TypeError, match="unknown option 'interval'"):
        c.start("web1", "host2", interval=5)
    with pytest.raises(TypeError, match="suspend=1 must be bool"):
        c.start("web1", "host2", suspend=1)
    with pytest.raises(TypeError, match="interval_ms=True must be int"):
        c.start("web1", "host2", interval_ms=True)
    with pytest.raises(ValueError):
        c.start("web1", "host2", heartbeat_ms=-1)
    with pytest.raises(kemari.DaemonNotRunning):
        c.start("web1", "host2", interval_ms=50, suspend=False, vdev="xvdb")


class ScriptedDaemon:
    """A unix socket server that answers each request line with the next scripted line."""

    def __init__(self, path, lines):
        self.requests = []
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(1)
        self.thread = threading.Thread(target=self._serve, args=(list(lines),), daemon=True)
        self.thread.start()

    def _serve(self, lines):
        conn, _ = self.srv.accept()
        with conn, conn.makefile("rwb") as f:
            while True:
                req = f.readline()
                if not req:
                    return
                self.requests.append(json.loads(req))
                if not lines:
                    return  # hang up without answering
                f.write(lines.pop(0).encode() + b"\n")
                f.flush()

    def close(self):
        self.srv.close()
        self.thread.join(timeout=5)


def test_requests_carry_the_version_and_errors_come_back_typed(absent_socket):
    d = ScriptedDaemon(absent_socket, ['{"v":1,"id":1,"ok":false,"error":{"code":"already-protected","message":"web1 is protected","fix":"kemari stop web1"}}'])
    try:
        with pytest.raises(kemari.AlreadyProtected) as ei:
            kemari.Client(absent_socket, timeout=5).start("web1", "host2", interval_ms=50)
        assert ei.value.fix == "kemari stop web1"
        assert d.requests == [{"v": 1, "id": 1, "op": "start", "dom": "web1", "host": "host2", "options": {"interval_ms": 50}}]
    finally:
        d.close()


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"v":2,"id":1,"ok":true,"result":{"type":"status","host":"h","guests":[]}}', "protocol version 2"),
        ("not json", "not JSON"),
        ('{"v":1,"id":1,"ok":true,"result":{"type":"guest"}}', "unexpected reply"),
        ('{"v":1,"id":1}', "no ok field"),
    ],
)
def test_replies_this_client_cannot_read_are_protocol_errors(absent_socket, line, match):
    d = ScriptedDaemon(absent_socket, [line])
    try:
        with pytest.raises(kemari.ProtocolError, match=match):
            kemari.Client(absent_socket, timeout=5).status()
    finally:
        d.close()


def test_a_daemon_that_hangs_up_is_connection_closed(absent_socket):
    d = ScriptedDaemon(absent_socket, [])
    try:
        with pytest.raises(kemari.ConnectionClosed):
            kemari.Client(absent_socket, timeout=5).status()
    finally:
        d.close()


def test_final_states():
    assert set(types.FINAL_STATES) < set(types.STATES)
    g = kemari.GuestStatus.from_json(dict(GUEST, state="failed-over"))
    assert g.is_final
