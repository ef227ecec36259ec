"""`python3 -m kemari` against real `kemarid --mem` daemons: each verb, --json, the errors and
the exit statuses (0 success, 1 failure, 2 usage)."""

import json
import socket

import pytest


def ok(run_cli, *args):
    p = run_cli(*args)
    assert p.returncode == 0, (args, p.stdout, p.stderr)
    return p.stdout


def fails(run_cli, *args):
    """Exit status 1, `kemari: WHAT: CAUSE` and `kemari: fix: ...` on stderr; returns stderr."""
    p = run_cli(*args)
    assert p.returncode == 1, (args, p.stdout, p.stderr)
    lines = p.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("kemari: ") and lines[1].startswith("kemari: fix: "), p.stderr
    if "--json" in args:
        err = json.loads(p.stdout)["error"]
        assert err["message"] and err["fix"]
        return err
    assert p.stdout == ""
    return p.stderr


def start(run_cli, pair, dom="web1", *extra):
    out = ok(run_cli, "--socket", pair.primary.socket_path, "start", dom, pair.secondary.peer, "--interval-ms", "50", *extra)
    return out


def test_start_status_checkpoint_stop(run_cli, pair):
    out = start(run_cli, pair)
    assert out.startswith(f"web1: protected, replica on {pair.secondary.peer_host}"), out
    table = ok(run_cli, "status", "--socket", pair.primary.socket_path)
    header, row = table.splitlines()[:2]
    assert header.split()[:4] == ["GUEST", "ROLE", "PEER", "STATE"]
    assert row.split()[:4] == ["web1", "primary", pair.secondary.peer_host, "protected"]
    st = json.loads(ok(run_cli, "--json", "status", "web1", "--socket", pair.primary.socket_path))
    assert st["type"] == "status" and st["guests"][0]["state"] == "protected"
    seq = st["guests"][0]["last_acked_seq"]
    out = ok(run_cli, "checkpoint", "web1", "--socket", pair.primary.socket_path)
    assert out.startswith("web1: checkpoint acknowledged, sequence ")
    assert int(out.split()[-1]) > seq
    r = json.loads(ok(run_cli, "checkpoint", "web1", "--json", "--socket", pair.primary.socket_path))
    assert r == {"type": "checkpoint", "dom": "web1", "acked_seq": r["acked_seq"]} and r["acked_seq"] > seq
    out = ok(run_cli, "stop", "web1", "--socket", pair.primary.socket_path)
    assert out.startswith("web1: protection stopped (role primary"), out


def test_start_json_no_wait(run_cli, pair):
    g = json.loads(ok(run_cli, "--json", "--socket", pair.primary.socket_path, "start", "web1", pair.secondary.peer, "--no-wait"))
    assert (g["dom"], g["role"], g["peer"]) == ("web1", "primary", pair.secondary.peer_host)
    pair.primary.client().wait("web1", timeout=30)


def test_failover(run_cli, pair):
    start(run_cli, pair)
    err = fails(run_cli, "failover", "web1", "--json", "--socket", pair.primary.socket_path)
    assert err["code"] == "not-secondary"
    pair.secondary.client().wait("web1", timeout=30)  # the replica is consistent
    out = ok(run_cli, "failover", "web1", "--force", "--socket", pair.secondary.socket_path)
    assert out.startswith("web1: runs on "), out


def test_events(run_cli, pair):
    start(run_cli, pair)
    out = ok(run_cli, "events", "web1", "--count", "1", "--json", "--socket", pair.primary.socket_path)
    ev = json.loads(out)
    assert ev["dom"] == "web1" and ev["kind"]
    out = ok(run_cli, "events", "--count", "1", "--socket", pair.primary.socket_path)
    t, dom = out.split()[:2]
    assert t.endswith("Z") and dom == "web1"


def test_errors(run_cli, pair, absent_socket):
    sock = pair.primary.socket_path
    err = fails(run_cli, "start", "nosuch", pair.secondary.peer, "--socket", sock)
    assert "nosuch" in err and pair.secondary.peer in err
    assert fails(run_cli, "--json", "stop", "nosuch", "--socket", sock)["code"] == "unknown-domain"
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    closed = "127.0.0.1:%d" % s.getsockname()[1]
    s.close()
    err = fails(run_cli, "start", "web1", closed, "--socket", sock)
    assert "web1" in err and closed in err
    assert fails(run_cli, "start", "web1", closed, "--json", "--socket", sock)["code"] == "unreachable-host"
    start(run_cli, pair)
    err = fails(run_cli, "start", "web1", pair.secondary.peer, "--socket", sock)
    assert "kemari stop web1" in err
    assert fails(run_cli, "--json", "start", "web1", pair.secondary.peer, "--socket", sock)["code"] == "already-protected"
    for verb in (["status"], ["stop", "web1"], ["failover", "web1"], ["checkpoint", "web1"], ["events"], ["start", "web1", "h"]):
        err = fails(run_cli, *verb, "--socket", absent_socket)
        assert "kemarid is not running" in err and absent_socket in err, err
        assert fails(run_cli, *verb, "--json", "--socket", absent_socket)["code"] == "daemon-not-running"


@pytest.mark.parametrize("args", [[], ["start", "web1"], ["status", "--bogus"], ["start", "a", "b", "--interval-ms", "x"]])
def test_usage_errors_exit_2(run_cli, args):
    p = run_cli(*args)
    assert p.returncode == 2, (args, p.stderr)
    assert "usage:" in p.stderr
