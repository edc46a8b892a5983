"""Several hosts on one machine: Linux network namespaces joined by one bridge.

Owns namespaces, veth pairs and a bridge it creates for a test, and their removal. Theory
of operation: `Bridge(n)` creates a "switch" namespace holding bridge br0, and n node
namespaces; node i has one interface, eth0, with 198.51.100.(10+i)/24 (a documentation
range), whose veth peer p<i> is a port of br0. Every link is created directly inside a
namespace, so the root namespace's interfaces and routes are never touched, and names
inside namespaces cannot collide with anything else. Each node namespace has its own
loopback and its own port space: a server bound to 0.0.0.0 in node 0 is reachable from
node 1 at 198.51.100.10, never at 127.0.0.1.

Promises:
* Everything a Bridge created is removed when its `with` block ends: normally, on an
  exception, on SIGINT (KeyboardInterrupt), and on SIGTERM, which the Bridge turns into
  an exception while it is open (then re-delivers once cleaned up, so the process still
  dies by SIGTERM). Processes still running inside its namespaces are killed then: a
  namespace is unique to its Bridge, so whatever runs there was started through it.
* Only what it created: names are "<prefix><pid>-<seq>-sw" and "<prefix><pid>-<seq>-n<i>".
  `cleanup_stale(prefix)` removes leftovers of runs killed outright (SIGKILL), and only
  those whose owning process is gone, so parallel runs never remove each other's.
* Addresses only from documentation ranges (RFC 5737, RFC 3849): a harness address never
  collides with a real one in a route or a log.
* The calling process never changes namespace: `call_in` enters one in a thread of its
  own, which ends with the call.

Must never: edit the root namespace, kill a process outside its namespaces, or wait
without a deadline. Linux only, as root (or CAP_SYS_ADMIN + CAP_NET_ADMIN), with
iproute2; `netns_available()` says whether that holds and why not.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import itertools
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from functools import cache
from types import FrameType, TracebackType
from typing import Any, TypeVar

from fflnode.errors import FflError

log = logging.getLogger(__name__)

DEFAULT_NAME_PREFIX = "fflns"
DEFAULT_PREFIX = "198.51.100."  # TEST-NET-2, RFC 5737
FIRST_HOST = 10  # node i is .(FIRST_HOST + i): .1-.9 stay free for a router or a gateway
# Node addresses must fit one /24 (or one /64) after FIRST_HOST; 200 nodes is more than
# one machine runs daemons for.
MAX_NODES = 200
PREFIX_LEN4, PREFIX_LEN6 = 24, 64
NODE_IF = "eth0"  # the node's interface, inside its namespace
BRIDGE_IF = "br0"  # the bridge, inside the switch namespace
# One `ip` command takes milliseconds; one that runs 10 s means the kernel or a mount is
# stuck, and the harness says so instead of hanging a test.
IP_TIMEOUT_S = 10.0
NETNS_DIR = "/run/netns"  # where `ip netns add` bind-mounts a namespace under its name
# Removing a namespace waits for the processes holding it (inside it, or with it open on
# the way in through `ip netns exec`) to die of SIGKILL: milliseconds; 5 s is slack for a
# loaded machine. Between scans of /proc it pauses this long.
RELEASE_DEADLINE_S = 5.0
RELEASE_POLL_S = 0.01
_DOCUMENTATION_NETS = tuple(
    ipaddress.ip_network(n)
    for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
)
_sequence = itertools.count()
CLONE_NEWNET = 0x40000000  # <sched.h>: setns() into a network namespace
T = TypeVar("T")


class NetnsError(FflError):
    """A namespace, link or address could not be created, changed or removed."""


class Terminated(BaseException):
    """SIGTERM arrived while a Bridge was open: unwinds the stack so it can clean up.

    A BaseException, like KeyboardInterrupt, so `except Exception` does not swallow it.
    """


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip ARGS`; NetnsError naming the command and the kernel's answer on failure."""
    cmd = ["ip", *args]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetnsError(f"{' '.join(cmd)}: {e}") from None
    if check and res.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)}: {res.stderr.strip() or f'exit {res.returncode}'}")
    return res


def list_netns() -> list[str]:
    """Names of the named network namespaces (`ip netns list`)."""
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


@cache
def netns_available() -> tuple[bool, str]:
    """(True, "") when this process can build a Bridge; else (False, why not).

    Tries what a Bridge does, on a throwaway namespace: create it, add a bridge and a
    veth pair inside, delete it. Cached: the answer does not change within a process.
    """
    if not os.path.exists("/proc/self/ns/net"):
        return False, "no Linux network namespaces here (/proc/self/ns/net is missing)"
    if shutil.which("ip") is None:
        return False, "iproute2's `ip` command is not installed"
    probe = f"{DEFAULT_NAME_PREFIX}{os.getpid()}-{next(_sequence)}-probe"
    try:
        _ip("netns", "add", probe)
    except NetnsError as e:
        return False, f"cannot create a network namespace (needs root or CAP_SYS_ADMIN): {e}"
    try:
        _ip("-n", probe, "link", "add", "name", BRIDGE_IF, "type", "bridge")
        _ip("-n", probe, "link", "add", "name", "va", "type", "veth", "peer", "name", "vb")
        return True, ""
    except NetnsError as e:
        return False, f"cannot create a bridge or a veth pair in a namespace: {e}"
    finally:
        _ip("netns", "del", probe, check=False)


@cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _owner_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def cleanup_stale(prefix: str = DEFAULT_NAME_PREFIX) -> list[str]:
    """Remove namespaces "<prefix><pid>-..." whose process <pid> no longer exists.

    These are what a run killed outright (SIGKILL, a crash of the interpreter) left
    behind, with whatever still runs inside them; namespaces of live processes, and names
    not of that form, are left alone. Returns the names removed.
    """
    pattern = re.compile(re.escape(prefix) + r"(\d+)-")
    stale = [
        name
        for name in list_netns()
        if (m := pattern.match(name)) is not None and not _owner_alive(int(m.group(1)))
    ]
    problems = _remove(stale, {ino for name in stale if (ino := _netns_inode(name))})
    if stale:
        log.warning("removed namespaces left by dead runs: %s", ", ".join(stale))
    if problems:
        log.error("stale namespaces not fully removed: %s", "; ".join(problems))
    return [name for name in stale if name not in list_netns()]


def _netns_inode(name: str) -> int | None:
    """The namespace's inode: what /proc/PID/ns/net of a process inside it names."""
    try:
        return os.stat(os.path.join(NETNS_DIR, name)).st_ino
    except OSError:
        return None


def holders(inodes: set[int]) -> set[int]:
    """PIDs whose network namespace is one of `inodes`, or that hold one open.

    The second kind is a process between `ip netns exec`'s open() and its setns(): it
    would enter the namespace after any scan of namespaces alone.
    """
    wanted = {f"net:[{ino}]" for ino in inodes}
    found: set[int] = set()
    if not wanted:
        return found
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if os.readlink(f"/proc/{entry.name}/ns/net") in wanted:
                found.add(int(entry.name))
                continue
            fds = os.listdir(f"/proc/{entry.name}/fd")
        except OSError:  # exited meanwhile, or a zombie: holds nothing
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry.name}/fd/{fd}") in wanted:
                    found.add(int(entry.name))
                    break
    return found


def _remove(names: Sequence[str], inodes: set[int]) -> list[str]:
    """Delete `names`, then SIGKILL every holder of `inodes` until none is left.

    Names go first, so no new process can enter; then the holders, all started through
    the namespace (it is unique to its Bridge). Returns what could not be done.
    """
    problems = []
    for name in names:
        res = _ip("netns", "del", name, check=False)
        if res.returncode != 0:
            problems.append(f"{name}: {res.stderr.strip()}")
    deadline = time.monotonic() + RELEASE_DEADLINE_S
    killed: set[int] = set()
    while held := holders(inodes):
        if time.monotonic() > deadline:
            problems.append(f"processes {sorted(held)} still hold the namespaces")
            break
        for pid in held:
            with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                os.kill(pid, signal.SIGKILL)
        killed |= held
        time.sleep(RELEASE_POLL_S)  # pause between polls; the deadline bounds the loop
    if killed:
        log.warning("killed processes still using namespaces %s: %s", list(names), sorted(killed))
    return problems


def _documentation_address(text: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise NetnsError(f"{what} {text!r} is not an IP address") from None
    if not any(addr in net for net in _DOCUMENTATION_NETS):
        raise NetnsError(
            f"{what} {addr} is outside the documentation ranges (192.0.2.0/24, "
            "198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32): use one of those"
        )
    return addr


class Bridge:
    """n hosts on one switch, each in its own network namespace (see the module doc).

    `n`: nodes, 1..MAX_NODES. `prefix`: IPv4 prefix, node i gets prefix + str(10 + i) /24.
    `prefix6`: optional IPv6 prefix, node i also gets prefix6 + str(10 + i) /64 (no
    duplicate-address detection, so it is usable at once). `name`: the base of every
    namespace name; the default "<DEFAULT_NAME_PREFIX><pid>-<seq>" is unique and lets
    `cleanup_stale` recognise leftovers.

    Setup and teardown each block for a few milliseconds per node (one `ip` command per
    step). Enter it from synchronous code or before `trio.run`; inside trio, SIGINT is
    trio's to deliver and the SIGTERM promise holds only where the Bridge was entered in
    the main thread with SIGTERM at its default.
    """

    def __init__(
        self,
        n: int,
        prefix: str = DEFAULT_PREFIX,
        name: str | None = None,
        *,
        prefix6: str | None = None,
    ) -> None:
        if not 1 <= n <= MAX_NODES:
            raise NetnsError(f"a Bridge has 1 to {MAX_NODES} nodes, not {n}")
        self.n = n
        self.name = name or f"{DEFAULT_NAME_PREFIX}{os.getpid()}-{next(_sequence)}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", self.name):
            raise NetnsError(f"namespace base name {self.name!r}: use 1-64 of [A-Za-z0-9_.-]")
        self.addresses = [str(self._host(prefix, i, "prefix")) for i in range(n)]
        self.addresses6 = (
            [str(self._host(prefix6, i, "prefix6")) for i in range(n)] if prefix6 else []
        )
        self.switch = f"{self.name}-sw"
        self.namespaces = [f"{self.name}-n{i}" for i in range(n)]
        self._created: list[str] = []  # namespaces this Bridge added, in order
        self._inodes: dict[str, int] = {}  # and their inodes, kept after they are removed
        self._previous_sigterm: Any = None
        self._installed_sigterm = False
        self._closing = False
        self._signalled: int | None = None

    @staticmethod
    def _host(prefix: str, i: int, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return _documentation_address(f"{prefix}{FIRST_HOST + i}", what)

    # ------------------------------------------------------------ context manager
    def __enter__(self) -> Bridge:
        self._install_sigterm()
        try:
            self.open()
        except BaseException:
            try:
                self.close(raise_errors=False)
            finally:
                self._restore_sigterm()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.close(raise_errors=exc is None)
        finally:
            self._restore_sigterm()

    def open(self) -> None:
        """Create the switch, the nodes and their links. Prefer `with Bridge(...)`."""
        self._add_netns(self.switch)
        _ip("-n", self.switch, "link", "add", "name", BRIDGE_IF, "type", "bridge")
        _ip("-n", self.switch, "link", "set", BRIDGE_IF, "up")
        for i, ns in enumerate(self.namespaces):
            self._add_netns(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            # Both ends are born inside their namespaces: no name in the root namespace.
            peer = ("peer", "name", self._port(i), "netns", self.switch)
            _ip("link", "add", "name", NODE_IF, "netns", ns, "type", "veth", *peer)
            _ip("-n", self.switch, "link", "set", self._port(i), "master", BRIDGE_IF, "up")
            _ip("-n", ns, "addr", "add", f"{self.addresses[i]}/{PREFIX_LEN4}", "dev", NODE_IF)
            if self.addresses6:
                addr6 = f"{self.addresses6[i]}/{PREFIX_LEN6}"
                _ip("-n", ns, "addr", "add", addr6, "dev", NODE_IF, "nodad")
            _ip("-n", ns, "link", "set", NODE_IF, "up")

    def close(self, raise_errors: bool = True) -> None:
        """Delete every namespace this Bridge created, killing what still uses them.

        Idempotent. Links go with their namespaces. Every namespace is attempted, then
        one NetnsError says what could not be removed (logged instead when
        `raise_errors` is false, so an exception in flight wins).
        """
        self._closing = True
        if not self._created:
            return
        problems = _remove(list(reversed(self._created)), set(self._inodes.values()))
        left = set(self._created) & set(list_netns())
        self._created = [ns for ns in self._created if ns in left]
        if problems or left:
            message = f"namespaces {self.name}-* not fully removed: {'; '.join(problems)}"
            if raise_errors:
                raise NetnsError(message)
            log.error("%s", message)

    def held_by(self) -> set[int]:
        """PIDs inside, or holding open, a namespace this Bridge created.

        Empty once the Bridge is closed. (Checked by namespace inode: long after close,
        the kernel may reuse an inode number for an unrelated namespace.)
        """
        return holders(set(self._inodes.values()))

    def _add_netns(self, ns: str) -> None:
        _ip("netns", "add", ns)  # fails if it exists: never adopt someone else's
        self._created.append(ns)
        inode = _netns_inode(ns)
        if inode is None:
            raise NetnsError(f"namespace {ns} was added but {NETNS_DIR}/{ns} is missing")
        self._inodes[ns] = inode

    # ---------------------------------------------------------------- signals
    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return  # someone handles it already (an outer Bridge, a supervisor)
        self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._installed_sigterm = True

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self._signalled = signum
        if not self._closing:
            raise Terminated(f"SIGTERM: removing namespaces {self.name}-*")

    def _restore_sigterm(self) -> None:
        if not self._installed_sigterm:
            return
        signal.signal(signal.SIGTERM, self._previous_sigterm)
        self._installed_sigterm = False
        if self._signalled is not None:  # cleaned up: now die of it, as asked
            os.kill(os.getpid(), self._signalled)

    # ---------------------------------------------------------------- nodes
    @staticmethod
    def _port(i: int) -> str:
        return f"p{i}"

    def _check(self, i: int) -> str:
        if not 0 <= i < self.n:
            raise NetnsError(f"node {i} does not exist (this Bridge has nodes 0..{self.n - 1})")
        return self.namespaces[i]

    def node_cmd(self, i: int, argv: Sequence[str]) -> list[str]:
        """`argv` wrapped to run inside node i's namespace (`ip netns exec NAME ...`)."""
        return ["ip", "netns", "exec", self._check(i), *argv]

    def run(
        self, i: int, argv: Sequence[str], *, timeout_s: float, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """`subprocess.run` of `argv` inside node i, text mode, output captured."""
        kwargs.setdefault("capture_output", True)
        return subprocess.run(self.node_cmd(i, argv), text=True, timeout=timeout_s, **kwargs)

    def call_in(self, i: int, fn: Callable[[], T], *, timeout_s: float) -> T:
        """`fn()` called in a new thread that has entered node i's network namespace.

        What `fn` opens there (sockets) belongs to node i's network: a supervisor outside
        reaches a node's 127.0.0.1 this way, e.g. its metrics endpoint. Only that thread
        ever changes namespace (setns acts per thread), and it ends with `fn`; `fn` must
        bound its own work (NetnsError if it still runs after `timeout_s`). Blocks; from
        trio, call it through `trio.to_thread.run_sync`. Returns what `fn` returns and
        raises what it raises.
        """
        path = os.path.join(NETNS_DIR, self._check(i))
        outcome: dict[str, Any] = {}

        def enter_and_call() -> None:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if _libc().setns(fd, CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise NetnsError(f"setns into {path}: {os.strerror(err)}")
                finally:
                    os.close(fd)
                outcome["value"] = fn()
            except BaseException as e:  # handed to the caller's thread below
                outcome["error"] = e

        thread = threading.Thread(target=enter_and_call, name=f"netns-{i}", daemon=True)
        thread.start()
        thread.join(timeout_s)
        if thread.is_alive():
            raise NetnsError(f"a call inside {self.namespaces[i]} still runs after {timeout_s} s")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def link_down(self, i: int) -> None:
        """Unplug node i: its switch port goes down, so nothing reaches it or leaves it.

        Like a pulled cable: node i's own interface and addresses stay, its peers get no
        reset, only silence (connects time out; established connections stall).
        """
        self._check(i)
        _ip("-n", self.switch, "link", "set", self._port(i), "down")

    def link_up(self, i: int) -> None:
        """Plug node i back in (its switch port forwards at once: no spanning tree)."""
        self._check(i)
        _ip("-n", self.switch, "link", "set", self._port(i), "up")


__all__ = [
    "Bridge",
    "NetnsError",
    "Terminated",
    "cleanup_stale",
    "holders",
    "list_netns",
    "netns_available",
]
