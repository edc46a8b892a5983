"""Across real hosts: `fflnode testnet --netns`, each node in its own network namespace.

Four nodes on one bridge at 198.51.100.10-13, each listening on 0.0.0.0:4001 with the
production [pubsub] settings, only node 0's address given as bootstrap. Needs root (or
CAP_SYS_ADMIN) and iproute2: skipped with the reason elsewhere, unless
FFLNODE_REQUIRE_NETNS=1 (CI runs as root), where being unable to create namespaces fails.
"""

from __future__ import annotations

import ipaddress
import os
import socket

import pytest

from fflnode.p2p import addrs
from fflnode_harness import netns
from fflnode_harness.netns import Bridge, NetnsError

AVAILABLE, WHY_NOT = netns.netns_available()
if not AVAILABLE and os.environ.get("FFLNODE_REQUIRE_NETNS") == "1":
    raise RuntimeError(f"FFLNODE_REQUIRE_NETNS=1 but {WHY_NOT}")
needs_netns = pytest.mark.skipif(not AVAILABLE, reason=f"network namespaces: {WHY_NOT}")

CALL_TIMEOUT_S = 10.0  # each call below does a few syscalls; this bounds a stuck one


def own_netns() -> str:
    return os.readlink("/proc/thread-self/ns/net")


@needs_netns
def test_call_in_runs_in_the_nodes_network_and_leaves_the_caller_where_it_was() -> None:
    before = own_netns()
    with Bridge(2) as br:
        found = br.call_in(0, addrs.interface_addresses, timeout_s=CALL_TIMEOUT_S)
        assert ("eth0", ipaddress.ip_address("198.51.100.10")) in found
        assert own_netns() == before  # only the call's own thread entered node 0

        def listen() -> socket.socket:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(1)
            return s

        # a socket opened there stays there: node 0's loopback, not ours, not node 1's
        server = br.call_in(0, listen, timeout_s=CALL_TIMEOUT_S)
        with server:
            port = server.getsockname()[1]
            br.call_in(
                0, lambda: socket.create_connection(("127.0.0.1", port), 1).close(),
                timeout_s=CALL_TIMEOUT_S,
            )  # fmt: skip
            for refused in (
                lambda: socket.create_connection(("127.0.0.1", port), 1),
                lambda: br.call_in(
                    1, lambda: socket.create_connection(("127.0.0.1", port), 1),
                    timeout_s=CALL_TIMEOUT_S,
                ),
            ):  # fmt: skip
                with pytest.raises(ConnectionRefusedError):
                    refused()
        with pytest.raises(ZeroDivisionError):  # what the call raises, the caller gets
            br.call_in(1, lambda: 1 / 0, timeout_s=CALL_TIMEOUT_S)
        with pytest.raises(NetnsError, match="node 2 does not exist"):
            br.call_in(2, own_netns, timeout_s=CALL_TIMEOUT_S)
    assert own_netns() == before
