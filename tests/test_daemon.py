"""`fflnode run` as a service: notify protocol, signals, identity across restarts."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, fflnode_cmd

SHUTDOWN_LIMIT_S = 5.0  # the brief: SIGINT/SIGTERM shut down cleanly within 5 s
STARTUP_TIMEOUT_S = 60.0  # imports torch and libp2p on a shared 2-core machine


def write_config(tmp_path: Path, nodes: int = 2, metrics: str = "") -> Path:
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        f"""
[node]
data_dir = "{tmp_path / "data"}"
listen = ["/ip4/127.0.0.1/tcp/0"]
metrics = "{metrics}"
[run]
run_id = "daemon-test"
seed = 1
nodes = {nodes}
rounds = 1
start_timeout_s = 600
"""
    )
    return cfg


def notifications(sock: socket.socket, until: str, timeout_s: float) -> list[dict[str, str]]:
    """Datagrams received until one carries `until` (e.g. READY=1)."""
    got = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(4096).decode()
        except TimeoutError:
            break
        fields = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
        got.append(fields)
        key, value = until.split("=", 1)
        if fields.get(key) == value:
            return got
    raise AssertionError(f"no {until} within {timeout_s} s; got {got}")


def start(cfg: Path, notify_path: str) -> subprocess.Popen:
    env = dict(os.environ, NOTIFY_SOCKET=notify_path)
    return subprocess.Popen(
        fflnode_cmd("run", "--config", str(cfg)),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_ready_then_clean_shutdown_on_signal(tmp_path: Path, notify_socket, sig):
    path, sock = notify_socket
    cfg = write_config(tmp_path)
    proc = start(cfg, path)
    try:
        ready = notifications(sock, "READY=1", STARTUP_TIMEOUT_S)[-1]
        assert ready["MAINPID"] == str(proc.pid)
        assert "listening on /ip4/127.0.0.1/tcp/" in ready["STATUS"]
        key = tmp_path / "data" / "identity.key"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        node = json.loads((tmp_path / "data" / "node.json").read_text())
        assert node["pid"] == proc.pid
        t0 = time.monotonic()
        proc.send_signal(sig)
        code = proc.wait(timeout=SHUTDOWN_LIMIT_S + 5)
        elapsed = time.monotonic() - t0
        assert elapsed < SHUTDOWN_LIMIT_S, f"shutdown took {elapsed:.1f} s"
        assert code == 128 + sig
        assert any(n.get("STOPPING") == "1" for n in notifications(sock, "STOPPING=1", 5))
        assert children_of(proc.pid) == []
        assert b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_identity_survives_restart(tmp_path: Path, notify_socket):
    path, sock = notify_socket
    cfg = write_config(tmp_path)
    ids = []
    for _ in range(2):
        proc = start(cfg, path)
        try:
            notifications(sock, "READY=1", STARTUP_TIMEOUT_S)
            ids.append(json.loads((tmp_path / "data" / "node.json").read_text())["peer_id"])
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=SHUTDOWN_LIMIT_S + 5)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert ids[0] == ids[1] and ids[0].startswith("12D3KooW")


def test_unsafe_identity_permissions_refused_with_exit_2(tmp_path: Path, notify_socket):
    path, sock = notify_socket
    cfg = write_config(tmp_path)
    (tmp_path / "data").mkdir()
    from fflnode.p2p.identity import load_or_create

    load_or_create(tmp_path / "data")
    (tmp_path / "data" / "identity.key").chmod(0o644)
    proc = start(cfg, path)
    out, err = proc.communicate(timeout=STARTUP_TIMEOUT_S)
    assert proc.returncode == 2
    assert b"chmod 600" in err and b"Traceback" not in err


def test_status_reads_a_running_node_through_its_metrics_endpoint(tmp_path: Path, notify_socket):
    path, sock = notify_socket
    cfg = write_config(tmp_path, metrics="127.0.0.1:0")
    proc = start(cfg, path)
    try:
        notifications(sock, "READY=1", STARTUP_TIMEOUT_S)
        out = subprocess.run(
            fflnode_cmd("status", "--config", str(cfg)),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        node = json.loads((tmp_path / "data" / "node.json").read_text())
        assert node["peer_id"] in out.stdout
        assert "phase join, round 0/1, peers alive 0" in out.stdout
        assert "merge: pending" in out.stdout
        host, port = node["metrics"].rsplit(":", 1)
        import trio

        from fflnode import metrics

        parsed = metrics.parse(trio.run(metrics.fetch, host, int(port)))
        assert parsed["fflnode_peak_rss_bytes"][0][1] > 50e6
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=SHUTDOWN_LIMIT_S + 5)
    gone = subprocess.run(
        fflnode_cmd("status", "--config", str(cfg)),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert gone.returncode == 1 and "no answer" in gone.stderr


# The supervisor's watchdog timeout given to the node: it pings every half of it.
WATCHDOG_USEC = 400_000
WATCHDOG_PINGS = 3  # pings that show the loop keeps pinging, not a single late one


def test_watchdog_pings_come_from_the_loop_and_stop_when_it_stalls(tmp_path: Path, notify_socket):
    """WATCHDOG=1 every WATCHDOG_USEC / 2 while the loop runs; a stopped process sends
    none (systemd would restart it), and pings resume when it runs again."""
    path, sock = notify_socket
    cfg = write_config(tmp_path)  # waits for a second node forever: an idle, live loop
    env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC=str(WATCHDOG_USEC))
    proc = subprocess.Popen(
        fflnode_cmd("run", "--config", str(cfg)), cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    timeout = WATCHDOG_USEC / 1e6
    try:
        notifications(sock, "READY=1", STARTUP_TIMEOUT_S)
        for _ in range(WATCHDOG_PINGS):
            notifications(sock, "WATCHDOG=1", 10 * timeout)
        proc.send_signal(signal.SIGSTOP)  # a stalled loop: what the watchdog is for
        stalled = []
        with contextlib.suppress(AssertionError):  # nothing must arrive while stopped
            stalled = notifications(sock, "WATCHDOG=1", 3 * timeout)
        # One ping may have been in flight when the signal landed; none after it.
        assert len([n for n in stalled if n.get("WATCHDOG") == "1"]) <= 1
        with contextlib.suppress(AssertionError):
            notifications(sock, "WATCHDOG=1", 3 * timeout)
            raise AssertionError("a stopped node kept pinging the watchdog")
        proc.send_signal(signal.SIGCONT)
        notifications(sock, "WATCHDOG=1", 10 * timeout)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=SHUTDOWN_LIMIT_S + 5) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()


def test_status_lines_report_rounds_and_peers_then_stopping(tmp_path: Path, notify_socket):
    """A one-node run: STATUS= carries the round and the peers, then STOPPING=1."""
    path, sock = notify_socket
    cfg = write_config(tmp_path, nodes=1)
    cfg.write_text(cfg.read_text().replace("rounds = 1", "rounds = 3"))
    proc = start(cfg, path)
    try:
        seen = notifications(sock, "STOPPING=1", STARTUP_TIMEOUT_S * 2)
        statuses = [n["STATUS"] for n in seen if "STATUS" in n]
        for r in (1, 2, 3):
            assert any(s.startswith(f"round {r}/3 ") and "peers 0/0" in s for s in statuses), (
                statuses
            )
        assert any(s.startswith("merged ") for s in statuses), statuses
        assert proc.wait(timeout=SHUTDOWN_LIMIT_S + 5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
