"""fflnode_harness.netns: real hosts in network namespaces, reachable only as real hosts are.

Needs root (or CAP_SYS_ADMIN) and iproute2: skipped with the reason elsewhere, unless
FFLNODE_REQUIRE_NETNS=1 (CI runs as root), where being unable to create namespaces fails.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fflnode_harness import netns
from fflnode_harness.netns import Bridge, NetnsError

# One bridge subnet (198.51.100.0/24) and one stale-namespace sweep for all of these:
# under pytest-xdist they run on one worker, one after another.
pytestmark = pytest.mark.xdist_group("netns")

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
AVAILABLE, WHY_NOT = netns.netns_available()
if not AVAILABLE and os.environ.get("FFLNODE_REQUIRE_NETNS") == "1":
    raise RuntimeError(f"FFLNODE_REQUIRE_NETNS=1 but {WHY_NOT}")
needs_netns = pytest.mark.skipif(not AVAILABLE, reason=f"network namespaces: {WHY_NOT}")

PORT = 4001  # every namespace has its own port space: no clash with anything outside
# A subprocess starting Python and importing fflnode takes well under a second here;
# these bound each wait so a broken network fails the test instead of hanging it.
START_TIMEOUT_S = 20.0
CONNECT_TIMEOUT_S = 1.0  # one connect on a bridge answers in microseconds when it can
# A connect to an unplugged node must fail within the client's timeout plus process start.
LINK_DOWN_BOUND_S = CONNECT_TIMEOUT_S + 5.0
RECONNECT_DEADLINE_S = 10.0  # after link_up, the port forwards at once; this is slack

# Accepts up to 100 connections (bounded), answering each with the address it was
# reached at; prints "ready" once listening on 0.0.0.0.
SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(16)
print("ready", flush=True)
for _ in range(100):
    c, _ = s.accept()
    c.sendall(("hello from " + c.getsockname()[0]).encode())
    c.close()
"""

# Connects to HOST PORT; retries until DEADLINE seconds have passed (0: one attempt).
# Prints "ok <reply>" or "err <exception> <errno>", then the seconds the last try took.
CLIENT = r"""
import socket, sys, time
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + float(sys.argv[4])
while True:
    t0 = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout) as c:
            print("ok", c.recv(100).decode(), round(time.monotonic() - t0, 3))
            break
    except OSError as e:
        result = f"err {type(e).__name__} {e.errno} {round(time.monotonic() - t0, 3)}"
        if time.monotonic() >= deadline:
            print(result)
            break
    time.sleep(0.05)  # pause between polls of the condition, bounded by the deadline
"""

# Opens a Bridge (named argv[1] with {pid} filled in, if given), prints its namespaces,
# then waits for the test to signal or kill it.
HOLDER = r"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
from fflnode_harness.netns import Bridge
name = sys.argv[1].format(pid=os.getpid()) if len(sys.argv) > 1 else None
with Bridge(2, name=name) as br:
    print(" ".join([br.switch, *br.namespaces]), flush=True)
    sys.stdin.read()
"""


def read_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    """The next stdout line of `proc`, waiting at most `timeout_s`."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    if not ready:
        raise TimeoutError(f"no output from {proc.args} within {timeout_s} s")
    return proc.stdout.readline().strip()


def stop(proc: subprocess.Popen[str]) -> None:
    """Kill a process this test started, and reap it."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=START_TIMEOUT_S)


def connect(br: Bridge, i: int, host: str, retry_s: float = 0.0) -> tuple[str, float]:
    """From node i, connect to host:PORT: ("ok hello from X" | "err Name errno", seconds)."""
    argv = [PYTHON, "-c", CLIENT, host, str(PORT), str(CONNECT_TIMEOUT_S), str(retry_s)]
    res = br.run(i, argv, timeout_s=START_TIMEOUT_S + retry_s)
    assert res.returncode == 0, res.stderr
    *words, took = res.stdout.split()
    return " ".join(words), float(took)


def start_server(br: Bridge, i: int) -> subprocess.Popen[str]:
    argv = br.node_cmd(i, [PYTHON, "-c", SERVER, str(PORT)])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert read_line(proc, START_TIMEOUT_S) == "ready"
    except BaseException:
        stop(proc)
        raise
    return proc


def ours(prefix: str) -> list[str]:
    return [ns for ns in netns.list_netns() if ns.startswith(prefix)]


def root_network() -> str:
    """The root namespace's links and routes, for checking that a Bridge never touches them."""
    parts = [["link", "show"], ["-4", "route", "show", "table", "all"], ["-6", "route", "show"]]
    return "\n".join(
        subprocess.run(["ip", *p], capture_output=True, text=True).stdout for p in parts
    )


@pytest.fixture(scope="module", autouse=True)
def no_stale_namespaces() -> None:
    if AVAILABLE:
        netns.cleanup_stale()


# --------------------------------------------------------------------------- pure
def test_netns_available_says_why_not() -> None:
    ok, why = netns.netns_available()
    assert isinstance(ok, bool) and isinstance(why, str)
    assert ok == (why == "")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 0}, "1 to 200 nodes"),
        ({"n": netns.MAX_NODES + 1}, "1 to 200 nodes"),
        ({"n": 2, "prefix": "10.0.0."}, "outside the documentation ranges"),
        ({"n": 2, "prefix6": "fd00::"}, "outside the documentation ranges"),
        ({"n": 2, "prefix": "banana"}, "not an IP address"),
        ({"n": 2, "name": "../etc"}, "namespace base name"),
    ],
)
def test_bridge_refuses_bad_arguments_before_creating_anything(kwargs: dict, match: str) -> None:
    with pytest.raises(NetnsError, match=match):
        Bridge(**kwargs)


def test_node_cmd_wraps_argv_in_the_nodes_namespace() -> None:
    br = Bridge(2, name="fflnsdoc")
    assert br.node_cmd(1, ["fflnode", "run"]) == [
        "ip", "netns", "exec", "fflnsdoc-n1", "fflnode", "run",
    ]  # fmt: skip
    assert br.addresses == ["198.51.100.10", "198.51.100.11"]
    with pytest.raises(NetnsError, match="node 2 does not exist"):
        br.node_cmd(2, ["true"])


# ----------------------------------------------------------------- real namespaces
@needs_netns
def test_wildcard_server_is_reachable_from_another_node_and_not_via_its_loopback() -> None:
    before = root_network()
    with Bridge(3) as br:
        assert root_network() == before  # the root namespace's links and routes untouched
        server = start_server(br, 0)
        try:
            assert connect(br, 1, "198.51.100.10")[0] == "ok hello from 198.51.100.10"
            assert connect(br, 2, "198.51.100.10")[0] == "ok hello from 198.51.100.10"
            # 127.0.0.1 in node 1 is node 1's own loopback: nothing listens there
            assert connect(br, 1, "127.0.0.1")[0] == "err ConnectionRefusedError 111"
            assert connect(br, 0, "127.0.0.1")[0] == "ok hello from 127.0.0.1"
        finally:
            stop(server)
    assert root_network() == before


@needs_netns
def test_link_down_cuts_a_node_off_within_a_bounded_time_and_link_up_restores_it() -> None:
    with Bridge(3) as br:
        server = start_server(br, 0)
        try:
            assert connect(br, 1, "198.51.100.10")[0].startswith("ok")
            br.link_down(0)
            t0 = time.monotonic()
            result, _ = connect(br, 1, "198.51.100.10")
            assert result.startswith("err"), result
            assert time.monotonic() - t0 < LINK_DOWN_BOUND_S
            assert connect(br, 2, "198.51.100.10")[0].startswith("err")
            assert connect(br, 2, "198.51.100.11")[0] == "err ConnectionRefusedError 111"
            br.link_up(0)
            result, _ = connect(br, 1, "198.51.100.10", retry_s=RECONNECT_DEADLINE_S)
            assert result == "ok hello from 198.51.100.10"
        finally:
            stop(server)


@needs_netns
def test_nothing_remains_after_the_context_exits() -> None:
    with Bridge(3) as br:
        created = [br.switch, *br.namespaces]
        assert sorted(ours(br.name + "-")) == sorted(created)
        # a process left running inside does not keep the namespace alive
        argv = br.node_cmd(2, [PYTHON, "-c", "input()"])
        left = subprocess.Popen(argv, stdin=subprocess.PIPE, text=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while left.pid not in br.held_by():
            assert time.monotonic() < deadline, "the process never entered the namespace"
    assert ours(br.name + "-") == []
    assert br.held_by() == set()
    assert left.wait(timeout=START_TIMEOUT_S) == -signal.SIGKILL
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert br.name not in links


@needs_netns
def test_a_process_entering_as_the_bridge_closes_is_killed_too() -> None:
    """`ip netns exec` opens the namespace, then enters it: closing in between must not
    leave it running in a namespace that has lost its name (and keeps its links)."""
    for _ in range(20):
        with Bridge(1) as br:
            argv = br.node_cmd(0, [PYTHON, "-c", "input()"])
            late = subprocess.Popen(argv, stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert br.held_by() == set()
        # killed inside or on its way in, or refused because the name was already gone
        assert late.wait(timeout=START_TIMEOUT_S) in (-signal.SIGKILL, 255)
        late.stdin.close()


@needs_netns
def test_an_exception_inside_the_context_still_cleans_up() -> None:
    with pytest.raises(RuntimeError, match="boom"), Bridge(2) as br:
        assert len(ours(br.name + "-")) == 3
        raise RuntimeError("boom")
    assert ours(br.name + "-") == []


@needs_netns
def test_a_failed_setup_removes_what_it_created() -> None:
    with Bridge(1) as first:
        clash = Bridge(2, name=first.name)  # its namespaces exist: setup must fail
        with pytest.raises(NetnsError, match="File exists"), clash:
            pass
        assert sorted(ours(first.name + "-")) == sorted([first.switch, *first.namespaces])
    assert ours(first.name + "-") == []


@needs_netns
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signalled_test_process_cleans_up(signum: int) -> None:
    holder = subprocess.Popen(
        [PYTHON, "-c", HOLDER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        names = read_line(holder, START_TIMEOUT_S).split()
        assert len(names) == 3 and all(n in netns.list_netns() for n in names)
        holder.send_signal(signum)
        code = holder.wait(timeout=START_TIMEOUT_S)
    finally:
        stop(holder)
    assert code == -signum  # cleaned up, then died of the signal as asked
    assert not set(names) & set(netns.list_netns())


@needs_netns
def test_cleanup_stale_removes_only_leftovers_of_dead_runs() -> None:
    prefix = f"fflst{os.getpid()}x"
    with Bridge(1, name=f"{prefix}{os.getpid()}-live") as live:
        holder = subprocess.Popen(
            [PYTHON, "-c", HOLDER, prefix + "{pid}-0"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        try:
            names = read_line(holder, START_TIMEOUT_S).split()
        finally:
            holder.kill()  # SIGKILL: no chance to clean up
            holder.wait(timeout=START_TIMEOUT_S)
        assert all(n.startswith(f"{prefix}{holder.pid}-0") for n in names)
        assert set(names) <= set(netns.list_netns())
        assert sorted(netns.cleanup_stale(prefix)) == sorted(names)
        assert not set(names) & set(netns.list_netns())
        assert sorted(ours(live.name)) == sorted([live.switch, *live.namespaces])  # alive


@needs_netns
def test_addrs_inside_a_namespace_see_the_namespaces_address() -> None:
    probe = r"""
import json
from fflnode.p2p import addrs
found = addrs.interface_addresses()
print(json.dumps({
    "found": [[n, str(a)] for n, a in found],
    "v4": [str(m) for m in addrs.expand_listen(["/ip4/0.0.0.0/tcp/4001"], found)],
    "v6": [str(m) for m in addrs.expand_listen(["/ip6/::/tcp/4001"], found)],
    "advertised": addrs.advertised([], ["/ip4/0.0.0.0/tcp/4001", "/ip6/::/tcp/4001"], found),
}))
"""
    with Bridge(3, prefix6="2001:db8::") as br:
        for i in range(3):
            res = br.run(i, [PYTHON, "-c", probe], timeout_s=START_TIMEOUT_S, cwd=REPO)
            assert res.returncode == 0, res.stderr
            got = json.loads(res.stdout)
            assert ["eth0", f"198.51.100.1{i}"] in got["found"]
            assert ["lo", "127.0.0.1"] in got["found"]
            assert got["v4"] == [f"/ip4/198.51.100.1{i}/tcp/4001"]
            assert got["v6"] == [f"/ip6/2001:db8::1{i}/tcp/4001"]
            assert sorted(got["advertised"]) == sorted(got["v4"] + got["v6"])
