"""Fixtures: a real `kemarid --mem` (the daemon's in-memory mode, no Xen needed) per test.

The binary is looked up in $KEMARID, else in the cargo target directory ($CARGO_TARGET_DIR or
../target) under debug/ then release/. `scripts/test` builds it before running pytest, so in CI
these tests always run; they are skipped (with the reason) only when no binary exists.
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PKG_ROOT = HERE.parent
REPO = PKG_ROOT.parent

sys.path.insert(0, str(PKG_ROOT))

import kemari  # noqa: E402


def _kemarid_binary():
    env = os.environ.get("KEMARID")
    if env:
        return Path(env)
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    for profile in ("debug", "release"):
        p = target / profile / "kemarid"
        if p.is_file() and os.access(p, os.X_OK):
            return p
    return None


KEMARID = _kemarid_binary()


class Daemon:
    """A `kemarid --mem --socket DIR/NAME.sock --peer-listen 127.0.0.1:0 ARGS` process, stopped
    (SIGTERM, then SIGKILL) at teardown."""

    def __init__(self, binary, workdir, name, extra_args=()):
        self.socket_path = str(Path(workdir) / f"{name}.sock")
        self.log_path = Path(workdir) / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [str(binary), "--mem", "--socket", self.socket_path, "--peer-listen", "127.0.0.1:0", *extra_args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.hello = self._wait_ready()

    def _wait_ready(self, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"kemarid --mem exited with status {self.proc.returncode} before serving "
                    f"{self.socket_path}:\n{self.log()}"
                )
            try:
                return kemari.Client(self.socket_path, timeout=2.0).hello()
            except kemari.DaemonNotRunning:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"kemarid --mem did not serve {self.socket_path} within {timeout} s:\n{self.log()}")

    @property
    def peer(self):
        """The HOST argument of `start` that reaches this daemon's peer port."""
        return self.hello.peer_listen

    @property
    def peer_host(self):
        """The host part of :attr:`peer`: the `peer` the other side's status shows."""
        return self.peer.rsplit(":", 1)[0]

    def log(self):
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def client(self, **kw):
        return kemari.Client(self.socket_path, **kw)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class Pair:
    """A primary with the guests web1 and db1, and a secondary."""

    def __init__(self, binary, workdir):
        self.secondary = Daemon(binary, workdir, "secondary")
        try:
            self.primary = Daemon(binary, workdir, "primary", ["--mem-guest", "web1:256", "--mem-guest", "db1:128"])
        except Exception:
            self.secondary.stop()
            raise

    def stop(self):
        self.primary.stop()
        self.secondary.stop()


def _need_binary():
    if KEMARID is None:
        if os.environ.get("KEMARI_PYTEST_REQUIRE_KEMARID"):
            pytest.fail("kemarid binary not found, and KEMARI_PYTEST_REQUIRE_KEMARID is set (scripts/test builds it)")
        pytest.skip(
            "kemarid binary not found (build it with `cargo build -p kemarid`, or set KEMARID=path); "
            "scripts/test builds it"
        )


@pytest.fixture
def pair():
    _need_binary()
    with tempfile.TemporaryDirectory(prefix="kemari-py-") as d:
        p = Pair(KEMARID, d)
        try:
            yield p
        finally:
            p.stop()


@pytest.fixture
def lonely():
    """One daemon without guests."""
    _need_binary()
    with tempfile.TemporaryDirectory(prefix="kemari-py-") as d:
        dm = Daemon(KEMARID, d, "lonely")
        try:
            yield dm
        finally:
            dm.stop()


@pytest.fixture
def absent_socket():
    with tempfile.TemporaryDirectory(prefix="kemari-py-") as d:
        yield str(Path(d) / "absent.sock")


@pytest.fixture
def run_cli():
    """Runs `python3 -m kemari ARGS` from the package root; returns the CompletedProcess."""

    def run(*args, timeout=60):
        return subprocess.run(
            [sys.executable, "-m", "kemari", *args],
            cwd=str(PKG_ROOT),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run
