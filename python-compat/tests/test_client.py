"""kemari.Client against real `kemarid --mem` daemons: a primary with guests and a secondary."""

import threading
import time

import pytest

import kemari


def start(pair, dom="web1", **opts):
    c = pair.primary.client()
    g = c.start(dom, pair.secondary.peer, interval_ms=50, **opts)
    assert isinstance(g, kemari.GuestStatus)
    assert (g.dom, g.role, g.peer) == (dom, "primary", pair.secondary.peer_host)
    return c.wait(dom, timeout=30)


def test_hello(lonely):
    h = lonely.client().hello()
    assert h.mode == "mem"
    assert kemari.PROTOCOL_VERSION in h.protocols
    assert h.pid == lonely.proc.pid
    assert h.peer_listen and h.peer_listen.startswith("127.0.0.1:")


def test_start_wait_and_status(pair):
    seen = []
    c = pair.primary.client()
    c.start("web1", pair.secondary.peer, interval_ms=50)
    g = c.wait("web1", timeout=30, progress=seen.append)
    assert g.state == "protected"
    assert seen and seen[-1] is g
    assert g.initial_sync is not None and g.initial_sync.done
    assert g.initial_sync.total > 0
    st = c.status()
    assert isinstance(st, kemari.Status)
    assert st.host == pair.primary.hello.host
    assert [x.dom for x in st.guests] == ["web1"]
    # Checkpoints flow: the sequence advances.
    deadline = time.monotonic() + 30
    while c.guest("web1").checkpoints < 3:
        assert time.monotonic() < deadline, c.guest("web1")
        time.sleep(0.05)
    g = c.guest("web1")
    assert g.last_acked_seq is not None and g.last_acked_seq >= 3
    assert isinstance(g.pause_ms, kemari.Quantiles)
    # The secondary holds the replica.
    s = pair.secondary.client().wait("web1", timeout=30)
    assert s.role == "secondary" and s.peer == pair.primary.hello.host


def test_checkpoint_returns_a_newer_sequence(pair):
    g = start(pair)
    r = pair.primary.client().checkpoint("web1", wait_ms=5000)
    assert isinstance(r, kemari.CheckpointResult)
    assert r.dom == "web1"
    assert r.acked_seq > g.last_acked_seq


def test_stop_ends_protection(pair):
    start(pair)
    c = pair.primary.client()
    g = c.stop("web1")
    assert g.role == "primary"
    g = c.wait("web1", state="stopped", timeout=30)
    assert g.is_final
    pair.secondary.client()
    deadline = time.monotonic() + 30
    while True:
        st = pair.secondary.client().status()
        s = st.guest("web1")
        if s is None or s.is_final:
            break
        assert time.monotonic() < deadline, s
        time.sleep(0.05)


def test_failover_on_the_secondary(pair):
    start(pair)
    with pytest.raises(kemari.NotSecondary) as ei:
        pair.primary.client().failover("web1")
    assert "web1" in ei.value.message and ei.value.fix
    pair.secondary.client().wait("web1", timeout=30)  # the replica is consistent
    g = pair.secondary.client().failover("web1", force=True)
    assert g.role == "secondary"
    assert g.state in ("failing-over", "failed-over")
    g = pair.secondary.client().wait("web1", state="failed-over", timeout=30)
    assert g.is_final


def test_events_generator(pair):
    got = []
    ready = threading.Event()

    def follow():
        # All guests' events: web1 is not known to the daemon before its start.
        stream = pair.primary.client().events()
        try:
            for ev in stream:
                got.append(ev)
                ready.set()
                if any(isinstance(e, kemari.StateEvent) and e.to == "protected" for e in got):
                    return
        finally:
            stream.close()

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    time.sleep(0.3)  # subscribed before the start
    start(pair)
    t.join(timeout=30)
    assert not t.is_alive(), got
    assert all(isinstance(e, kemari.Event) and e.dom == "web1" for e in got)
    states = [e.to for e in got if isinstance(e, kemari.StateEvent)]
    assert states[-1] == "protected", got
    assert got[0].time > 1.7e9


def test_events_end_with_connection_closed_when_the_daemon_stops(lonely):
    stream = lonely.client().events()
    errors = []

    def follow():
        try:
            for _ in stream:
                pass
        except kemari.KemariError as e:
            errors.append(e)

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    time.sleep(0.3)
    lonely.stop()
    t.join(timeout=15)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], kemari.ConnectionClosed), errors


# --- errors -------------------------------------------------------------------------------


def test_unknown_domain(pair):
    c = pair.primary.client()
    with pytest.raises(kemari.UnknownDomain) as ei:
        c.start("nosuch", pair.secondary.peer)
    assert "nosuch" in ei.value.message and ei.value.fix
    for call in (c.stop, c.failover, c.checkpoint, c.status):
        with pytest.raises(kemari.UnknownDomain) as ei:
            call("nosuch")
        assert "nosuch" in ei.value.message, call


def test_unreachable_host(pair):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    closed = "127.0.0.1:%d" % s.getsockname()[1]
    s.close()
    with pytest.raises(kemari.UnreachableHost) as ei:
        pair.primary.client().start("web1", closed)
    assert "web1" in ei.value.message and closed in ei.value.message
    assert "kemarid" in ei.value.fix
    # Nothing half-applied: the guest can be protected afterwards.
    start(pair)


def test_daemon_not_running(absent_socket):
    c = kemari.Client(absent_socket)
    for call in (c.hello, c.status, lambda: c.start("web1", "host2"), lambda: c.stop("web1"),
                 lambda: c.failover("web1"), lambda: c.checkpoint("web1"), lambda: next(c.events())):
        with pytest.raises(kemari.DaemonNotRunning) as ei:
            call()
        assert absent_socket in ei.value.message
        assert "kemarid" in ei.value.fix


def test_already_protected(pair):
    start(pair)
    with pytest.raises(kemari.AlreadyProtected) as ei:
        pair.primary.client().start("web1", pair.secondary.peer)
    assert "web1" in ei.value.message
    assert "kemari stop web1" in ei.value.fix
    assert pair.primary.client().guest("web1").state == "protected"
