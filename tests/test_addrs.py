"""fflnode.p2p.addrs: scopes, wildcard expansion, advertised and observed addresses, dial policy."""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import time

import multiaddr
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fflnode.errors import ConfigError
from fflnode.p2p import addrs
from fflnode.p2p.addrs import (
    DNS,
    DOCUMENTATION,
    INVALID,
    LINK_LOCAL,
    LOOPBACK,
    MULTICAST,
    PRIVATE,
    PUBLIC,
    UNSPECIFIED,
    AddressError,
    DialPolicy,
    ObservedAddrs,
)

PEER_A = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
PEER_B = "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"


def ip(s: str) -> addrs.IPAddress:
    return ipaddress.ip_address(s)


# ----------------------------------------------------------------------------- scope
SCOPE_TABLE = [
    ("/ip4/0.0.0.0/tcp/4001", UNSPECIFIED),
    ("/ip6/::/tcp/4001", UNSPECIFIED),
    ("/ip6/::ffff:0.0.0.0/tcp/4001", UNSPECIFIED),
    ("/ip4/127.0.0.1/tcp/4001", LOOPBACK),
    ("/ip4/127.8.9.10/tcp/1", LOOPBACK),
    ("/ip6/::1/tcp/4001", LOOPBACK),
    ("/ip6/::ffff:127.0.0.1/tcp/4001", LOOPBACK),  # mapped: reaches 127.0.0.1
    ("/ip4/169.254.3.4/tcp/1", LINK_LOCAL),
    ("/ip6/fe80::1/tcp/1", LINK_LOCAL),
    ("/ip4/10.1.2.3/tcp/1", PRIVATE),
    ("/ip4/172.16.0.1/tcp/1", PRIVATE),
    ("/ip4/172.31.255.254/tcp/1", PRIVATE),
    ("/ip4/192.168.1.1/tcp/1", PRIVATE),
    ("/ip4/100.64.0.1/tcp/1", PRIVATE),  # carrier-grade NAT
    ("/ip6/fd00::2/tcp/1", PRIVATE),
    ("/ip6/fc00::1/tcp/1", PRIVATE),
    ("/ip4/8.8.8.8/tcp/1", PUBLIC),
    ("/ip4/172.32.0.1/tcp/1", PUBLIC),  # just outside 172.16/12
    ("/ip6/2606:4700::1/tcp/1", PUBLIC),
    ("/ip6/64:ff9b::8.8.8.8/tcp/1", PUBLIC),  # NAT64 of a public IPv4
    ("/ip6/64:ff9b::10.0.0.1/tcp/1", INVALID),  # NAT64 of a private one: not routable
    ("/ip4/224.0.0.1/tcp/1", MULTICAST),
    ("/ip6/ff02::1/tcp/1", MULTICAST),
    ("/ip4/192.0.2.7/tcp/1", DOCUMENTATION),
    ("/ip4/198.51.100.10/tcp/4001", DOCUMENTATION),
    ("/ip4/203.0.113.255/tcp/1", DOCUMENTATION),
    ("/ip6/2001:db8::10/tcp/1", DOCUMENTATION),
    ("/ip4/198.51.100.10/tcp/4001/p2p/" + PEER_A, DOCUMENTATION),
    ("/ip4/255.255.255.255/tcp/1", INVALID),
    ("/ip4/240.0.0.1/tcp/1", INVALID),
    ("/ip4/0.1.2.3/tcp/1", INVALID),
    ("/ip6/fec0::1/tcp/1", INVALID),  # deprecated site-local
    ("/dns4/example.com/tcp/4001", DNS),
    ("/dns6/node.example.org./tcp/4001", DNS),
    ("/dns/example.com/tcp/4001", DNS),
    ("/dns4/localhost/tcp/4001", LOOPBACK),
    ("/dns4/a.b.LOCALHOST/tcp/4001", LOOPBACK),
    ("/ip4/8.8.8.8/udp/4001", INVALID),
    ("/ip4/8.8.8.8/tcp/4001/ws", INVALID),
    ("/ip4/8.8.8.8", INVALID),
    ("/ip6zone/eth0/ip6/fe80::1/tcp/1", INVALID),
    ("/unix/tmp/sock", INVALID),
    ("/p2p/" + PEER_A, INVALID),
]


@pytest.mark.parametrize(("maddr", "expected"), SCOPE_TABLE)
def test_scope_classifies_each_range(maddr: str, expected: str) -> None:
    assert addrs.scope(maddr) == expected
    assert addrs.scope(multiaddr.Multiaddr(maddr)) == expected


HOSTILE = [
    "",
    "garbage",
    "/",
    "//",
    "/ip4/",
    "/ip4/999.1.1.1/tcp/1",
    "/ip4/1.2.3.4/tcp/65536",
    "/ip4/1.2.3.4/tcp/-1",
    "/ip6/:::/tcp/1",
    "/dns4/" + "a" * 300 + "/tcp/1",
    "/dns4/-bad-.example/tcp/1",
    "/ip4/1.2.3.4/tcp/1/p2p/notapeer",
    "/ip4/1.2.3.4/tcp/1" * 1000,
    "\x00\xff\ud800",
    "/ip4/1.2.3.4/tcp/1/p2p/" + PEER_A + "/p2p/" + PEER_A,
    None,
    42,
    b"/ip4/1.2.3.4/tcp/1",
    ["/ip4/1.2.3.4/tcp/1"],
    object(),
]


@pytest.mark.parametrize("bad", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_addresses_are_invalid_and_never_raise(bad: object) -> None:
    assert addrs.parse(bad) is None
    assert addrs.scope(bad) == INVALID
    assert not DialPolicy().allows(bad)
    assert DialPolicy().why_not(bad)
    assert addrs.observation_refusal(bad)
    assert not ObservedAddrs().record(PEER_A, bad)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200) | st.from_regex(r"/(ip4|ip6|dns4|tcp|p2p)/[^/]{0,40}(/tcp/\d{1,6})?"))
def test_arbitrary_text_never_raises(text: str) -> None:
    s = addrs.scope(text)
    assert s in addrs.SCOPES
    DialPolicy().why_not(text)
    ObservedAddrs().record(PEER_A, text)
    out = DialPolicy().filter([text], PEER_A)
    assert len(out) <= 1
    assert not out or s in addrs.DEFAULT_DIAL_SCOPES


def test_parse_splits_base_and_peer() -> None:
    a = addrs.parse("/ip6/2001:0db8:0000::0010/tcp/4001/p2p/" + PEER_B)
    assert a is not None
    assert (a.proto, a.host, a.port, a.peer) == ("ip6", "2001:db8::10", 4001, PEER_B)
    assert a.base == "/ip6/2001:db8::10/tcp/4001"


# ---------------------------------------------------------------------- expand_listen
LO4, LO6 = ("lo", ip("127.0.0.1")), ("lo", ip("::1"))
ETH4 = ("eth0", ip("198.51.100.10"))
ETH4B = ("eth1", ip("10.0.0.5"))
PUB4 = ("wan0", ip("8.8.4.4"))
ETH6 = ("eth0", ip("2001:db8::10"))
LL6 = ("eth0", ip("fe80::1"))
LL4 = ("eth2", ip("169.254.1.1"))
ULA6 = ("eth1", ip("fd00::5"))
IFACE_SETS = {
    "none": [],
    "lo-only": [LO4, LO6],
    "v4-lan": [LO4, ETH4, LO6, LL6],
    "two-v4": [LO4, ETH4, ETH4B],
    "dual-stack": [LO4, ETH4, LO6, LL6, ETH6, ULA6],
    "v6-only": [LO6, LL6, ETH6],
    "link-local-only": [LO4, LL4, LO6, LL6],
    "public": [LO4, PUB4, ETH4B],
}
WILDCARDS = {
    "v4": ["/ip4/0.0.0.0/tcp/4001"],
    "v6": ["/ip6/::/tcp/4001"],
    "both": ["/ip4/0.0.0.0/tcp/4001", "/ip6/::/tcp/4002"],
    "with-p2p": ["/ip4/0.0.0.0/tcp/4001/p2p/" + PEER_A],
}


@pytest.mark.parametrize("ifaces", IFACE_SETS, ids=str)
@pytest.mark.parametrize("listen", WILDCARDS, ids=str)
def test_wildcard_listen_never_expands_to_an_unspecified_address(listen: str, ifaces: str) -> None:
    out = addrs.expand_listen(WILDCARDS[listen], IFACE_SETS[ifaces])
    for m in out:
        assert addrs.scope(m) not in (UNSPECIFIED, INVALID, MULTICAST, LINK_LOCAL), m
        assert m.value_for_protocol("tcp") in ("4001", "4002")
    assert len({str(m) for m in out}) == len(out)  # no duplicates
    advertised = addrs.advertised([], WILDCARDS[listen], IFACE_SETS[ifaces], ObservedAddrs())
    assert all(addrs.scope(a) != UNSPECIFIED for a in advertised)


EXPAND_TABLE = [
    # (listen, interfaces, expected)
    (["/ip4/0.0.0.0/tcp/4001"], IFACE_SETS["v4-lan"], ["/ip4/198.51.100.10/tcp/4001"]),
    (
        ["/ip4/0.0.0.0/tcp/4001"],
        IFACE_SETS["two-v4"],
        ["/ip4/198.51.100.10/tcp/4001", "/ip4/10.0.0.5/tcp/4001"],
    ),
    (
        ["/ip6/::/tcp/4001"],
        IFACE_SETS["dual-stack"],
        ["/ip6/2001:db8::10/tcp/4001", "/ip6/fd00::5/tcp/4001"],
    ),
    # nothing but loopback: the node still reaches itself
    (["/ip4/0.0.0.0/tcp/4001"], IFACE_SETS["lo-only"], ["/ip4/127.0.0.1/tcp/4001"]),
    (
        ["/ip4/0.0.0.0/tcp/1", "/ip6/::/tcp/2"],
        IFACE_SETS["lo-only"],
        ["/ip4/127.0.0.1/tcp/1", "/ip6/::1/tcp/2"],
    ),
    # loopback is not added on IPv6 when IPv4 has a real address
    (
        ["/ip4/0.0.0.0/tcp/1", "/ip6/::/tcp/2"],
        IFACE_SETS["v4-lan"],
        ["/ip4/198.51.100.10/tcp/1"],
    ),
    # link-local is never expanded (it needs a zone); loopback is the fallback
    (["/ip4/0.0.0.0/tcp/1"], IFACE_SETS["link-local-only"], ["/ip4/127.0.0.1/tcp/1"]),
    (["/ip4/0.0.0.0/tcp/1"], IFACE_SETS["none"], []),
    # a concrete listen address is kept, loopback included, /p2p/ dropped
    (["/ip4/127.0.0.1/tcp/4001"], IFACE_SETS["v4-lan"], ["/ip4/127.0.0.1/tcp/4001"]),
    (
        ["/ip4/127.0.0.1/tcp/5/p2p/" + PEER_A, "/ip4/0.0.0.0/tcp/6"],
        IFACE_SETS["v4-lan"],
        ["/ip4/127.0.0.1/tcp/5", "/ip4/198.51.100.10/tcp/6"],
    ),
    (["/ip4/0.0.0.0/tcp/1", "/ip4/0.0.0.0/tcp/1"], [ETH4], ["/ip4/198.51.100.10/tcp/1"]),
]


@pytest.mark.parametrize(("listen", "ifaces", "expected"), EXPAND_TABLE)
def test_expand_listen(listen: list[str], ifaces: list, expected: list[str]) -> None:
    assert [str(m) for m in addrs.expand_listen(listen, ifaces)] == expected


def test_expand_listen_accepts_interface_addresses_as_strings() -> None:
    out = addrs.expand_listen(["/ip4/0.0.0.0/tcp/7"], [("eth0", "198.51.100.11")])
    assert [str(m) for m in out] == ["/ip4/198.51.100.11/tcp/7"]


@pytest.mark.parametrize(
    ("listen", "ifaces"),
    [
        (["/ip4/0.0.0.0/tcp/0"], [ETH4]),  # the configured address, not the bound one
        (["/dns4/example.com/tcp/1"], [ETH4]),
        (["/ip4/1.2.3.4/udp/1"], [ETH4]),
        (["garbage"], [ETH4]),
        (["/ip4/0.0.0.0/tcp/1"], [("eth0", "not-an-ip")]),
    ],
)
def test_expand_listen_rejects_unusable_own_addresses_as_config_errors(
    listen: list[str], ifaces: list
) -> None:
    with pytest.raises(AddressError) as e:
        addrs.expand_listen(listen, ifaces)
    assert isinstance(e.value, ConfigError)


def test_expand_listen_reads_a_bounded_number_of_interfaces() -> None:
    many = (("veth", ipaddress.IPv4Address(int(ip("10.0.0.0")) + i)) for i in range(10**6))
    t0 = time.perf_counter()
    out = addrs.expand_listen(["/ip4/0.0.0.0/tcp/1"], many)
    assert len(out) == addrs.MAX_INTERFACE_ADDRS
    assert time.perf_counter() - t0 < 5


# ------------------------------------------------------------------------ advertised
def test_announce_wins_verbatim() -> None:
    announce = ["/dns4/node.example.org/tcp/4001", "/ip4/203.0.113.5/tcp/4001/p2p/" + PEER_A]
    obs = ObservedAddrs()
    obs.record(PEER_A, "/ip4/203.0.113.9/tcp/4001")
    obs.record(PEER_B, "/ip4/203.0.113.9/tcp/4001")
    out = addrs.advertised(announce, ["/ip4/0.0.0.0/tcp/4001"], [ETH4], obs)
    assert out == announce


@pytest.mark.parametrize(
    "bad",
    [
        "/ip4/0.0.0.0/tcp/4001",
        "/ip6/::/tcp/4001",
        "/ip4/203.0.113.5/tcp/0",
        "/ip4/203.0.113.5/udp/4001",
        "/ip4/203.0.113.5/tcp/4001/ws",
        "/unix/run/x",
        "203.0.113.5:4001",
        "",
    ],
)
def test_announce_is_validated(bad: str) -> None:
    with pytest.raises(AddressError, match=r"node\.announce\[1\]"):
        addrs.advertised(["/ip4/203.0.113.5/tcp/1", bad], ["/ip4/0.0.0.0/tcp/1"], [ETH4], None)


def test_announce_longer_than_a_heartbeat_is_refused() -> None:
    announce = [f"/ip4/203.0.113.{i}/tcp/4001" for i in range(addrs.MAX_ADVERTISED + 1)]
    with pytest.raises(AddressError, match="more than 16"):
        addrs.validate_announce(announce)
    assert addrs.validate_announce(announce[:16]) == announce[:16]


def test_advertised_adds_observed_addresses_only_once_two_peers_confirm() -> None:
    obs = ObservedAddrs()
    listen = ["/ip4/0.0.0.0/tcp/4001"]
    obs.record(PEER_A, "/ip4/203.0.113.9/tcp/4001")
    obs.record(PEER_A, "/ip4/203.0.113.9/tcp/4001")  # the same peer again: one vote
    assert addrs.advertised([], listen, [ETH4], obs) == ["/ip4/198.51.100.10/tcp/4001"]
    obs.record(PEER_B, "/ip4/203.0.113.9/tcp/4001/p2p/" + PEER_A)
    assert addrs.advertised([], listen, [ETH4], obs) == [
        "/ip4/198.51.100.10/tcp/4001",
        "/ip4/203.0.113.9/tcp/4001",
    ]


def test_advertised_orders_public_first_and_skips_duplicates_of_local_ones() -> None:
    obs = ObservedAddrs()
    for peer in (PEER_A, PEER_B):
        obs.record(peer, "/ip4/198.51.100.10/tcp/4001")  # already local
    out = addrs.advertised([], ["/ip4/0.0.0.0/tcp/4001"], [ETH4B, ETH4, PUB4], obs)
    assert out == [
        "/ip4/8.8.4.4/tcp/4001",
        "/ip4/10.0.0.5/tcp/4001",
        "/ip4/198.51.100.10/tcp/4001",
    ]


def test_advertised_is_capped_with_slots_reserved_for_observed_addresses() -> None:
    ifaces = [("veth", ip(f"10.0.0.{i}")) for i in range(1, 40)]
    obs = ObservedAddrs()
    for i in range(10):
        for peer in (PEER_A, PEER_B):
            obs.record(peer, f"/ip4/203.0.113.{i}/tcp/4001")
    out = addrs.advertised([], ["/ip4/0.0.0.0/tcp/4001"], ifaces, obs)
    assert len(out) == addrs.MAX_ADVERTISED
    observed = [a for a in out if a.startswith("/ip4/203.0.113.")]
    assert len(observed) == addrs.MAX_OBSERVED_ADVERTISED
    assert out[0] == "/ip4/10.0.0.1/tcp/4001"


# -------------------------------------------------------------------- ObservedAddrs
@pytest.mark.parametrize(
    ("observed", "accepted"),
    [
        ("/ip4/203.0.113.9/tcp/4001", True),
        ("/ip4/8.8.8.8/tcp/4001", True),
        ("/ip4/10.0.0.9/tcp/4001", True),
        ("/ip6/2001:db8::9/tcp/4001", True),
        ("/ip4/0.0.0.0/tcp/4001", False),
        ("/ip4/127.0.0.1/tcp/4001", False),  # a peer on our machine, or a liar
        ("/ip6/::1/tcp/4001", False),
        ("/ip6/::ffff:127.0.0.1/tcp/4001", False),
        ("/ip4/169.254.0.9/tcp/4001", False),
        ("/ip4/224.0.0.9/tcp/4001", False),
        ("/ip4/203.0.113.9/tcp/0", False),
        ("/dns4/example.com/tcp/4001", False),  # peers observe IPs, never names
        ("/ip4/203.0.113.9/udp/4001", False),
    ],
)
def test_observed_addresses_must_be_reachable_from_elsewhere(observed: str, accepted: bool) -> None:
    obs = ObservedAddrs()
    assert obs.record(PEER_A, observed) is accepted
    assert obs.record(PEER_B, observed) is accepted
    assert obs.confirmed() == ([addrs.parse(observed).base] if accepted else [])


def test_observed_address_needs_two_distinct_peers() -> None:
    obs = ObservedAddrs()
    for _ in range(100):
        obs.record(PEER_A, "/ip4/203.0.113.9/tcp/4001")
    assert obs.confirmed() == []
    obs.record(PEER_B, "/ip4/203.0.113.9/tcp/4001")
    assert obs.confirmed() == ["/ip4/203.0.113.9/tcp/4001"]
    obs.forget(PEER_B)
    assert obs.confirmed() == []


def test_ephemeral_ports_never_confirm() -> None:
    obs = ObservedAddrs()
    for port, peer in enumerate(["p1", "p2", "p3", "p4"], start=50000):
        obs.record(peer, f"/ip4/203.0.113.9/tcp/{port}")
    assert obs.confirmed() == []


def test_confirmed_lists_the_most_confirmed_first() -> None:
    obs = ObservedAddrs()
    for peer in ("p1", "p2"):
        obs.record(peer, "/ip4/203.0.113.1/tcp/1")
    for peer in ("p3", "p4", "p5"):
        obs.record(peer, "/ip4/203.0.113.2/tcp/1")
    assert obs.confirmed() == ["/ip4/203.0.113.2/tcp/1", "/ip4/203.0.113.1/tcp/1"]


def test_observed_memory_is_bounded_against_a_flood() -> None:
    obs = ObservedAddrs()
    t0 = time.perf_counter()
    for i in range(2 * addrs.MAX_OBSERVERS):
        for j in range(addrs.MAX_OBSERVED_PER_PEER + 2):
            obs.record(f"sybil{i}", f"/ip4/203.0.{j}.{i % 250}/tcp/{1 + i}")
    assert len(obs) == addrs.MAX_OBSERVERS
    assert obs.held() == addrs.MAX_OBSERVERS * addrs.MAX_OBSERVED_PER_PEER
    obs.record("sybil0", "/ip4/203.0.113.1/tcp/1")  # was evicted: least recently heard
    obs.record("newcomer", "/ip4/203.0.113.1/tcp/1")
    assert obs.confirmed() == ["/ip4/203.0.113.1/tcp/1"]
    assert len(obs) == addrs.MAX_OBSERVERS
    assert time.perf_counter() - t0 < 30


def test_observed_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ObservedAddrs(min_peers=0)


# ------------------------------------------------------------------------ DialPolicy
DEFAULT = DialPolicy()
ON_LOOPBACK = DialPolicy.for_listen(["/ip4/127.0.0.1/tcp/4001"])
ON_WILDCARD = DialPolicy.for_listen(["/ip4/0.0.0.0/tcp/4001", "/ip6/::/tcp/4001"])
ON_LAN = DialPolicy.for_listen(["/ip4/198.51.100.10/tcp/4001"])
ON_LINK_LOCAL = DialPolicy.for_listen(["/ip6/fe80::1/tcp/4001"])

POLICY_TABLE = [
    # (policy, address, dialled?)
    (DEFAULT, "/ip4/8.8.8.8/tcp/4001", True),
    (DEFAULT, "/ip4/10.0.0.1/tcp/4001", True),
    (DEFAULT, "/ip4/198.51.100.11/tcp/4001", True),
    (DEFAULT, "/dns4/node.example.org/tcp/4001", True),
    (DEFAULT, "/ip4/127.0.0.1/tcp/4001", False),
    (DEFAULT, "/dns4/localhost/tcp/4001", False),
    (DEFAULT, "/ip6/::ffff:127.0.0.1/tcp/4001", False),
    (DEFAULT, "/ip4/169.254.1.1/tcp/4001", False),
    (DEFAULT, "/ip4/0.0.0.0/tcp/4001", False),
    (DEFAULT, "/ip4/224.0.0.1/tcp/4001", False),
    (DEFAULT, "/ip4/8.8.8.8/tcp/0", False),
    (DEFAULT, "/ip4/8.8.8.8/udp/4001", False),
    (ON_LOOPBACK, "/ip4/127.0.0.1/tcp/4002", True),  # the testnet
    (ON_LOOPBACK, "/ip6/::1/tcp/4002", True),
    (ON_LOOPBACK, "/ip4/0.0.0.0/tcp/4002", False),
    (ON_LOOPBACK, "/ip4/169.254.1.1/tcp/4001", False),
    (ON_WILDCARD, "/ip4/0.0.0.0/tcp/4002", False),  # the bug this module exists for
    (ON_WILDCARD, "/ip4/127.0.0.1/tcp/4002", False),
    (ON_WILDCARD, "/ip4/198.51.100.11/tcp/4002", True),
    (ON_LAN, "/ip4/127.0.0.1/tcp/4002", False),
    (ON_LAN, "/ip4/198.51.100.11/tcp/4002", True),
    (ON_LINK_LOCAL, "/ip6/fe80::2/tcp/4001", True),
    (ON_LINK_LOCAL, "/ip6/::1/tcp/4001", False),
    (DialPolicy(frozenset({PUBLIC})), "/ip4/10.0.0.1/tcp/4001", False),
    (DialPolicy(frozenset({PUBLIC, UNSPECIFIED})), "/ip4/0.0.0.0/tcp/1", False),  # never
]


@pytest.mark.parametrize(("policy", "maddr", "dialled"), POLICY_TABLE)
def test_dial_policy(policy: DialPolicy, maddr: str, dialled: bool) -> None:
    assert policy.allows(maddr) is dialled
    assert policy.allows(multiaddr.Multiaddr(maddr)) is dialled
    assert bool(policy.why_not(maddr)) is not dialled


def test_why_not_says_what_to_do_about_a_peers_loopback_address() -> None:
    why = DEFAULT.why_not("/ip4/127.0.0.1/tcp/4001")
    assert "loopback" in why and "listens on a loopback address" in why
    assert "unspecified" in DEFAULT.why_not("/ip4/0.0.0.0/tcp/4001")
    assert "port 0" in DEFAULT.why_not("/ip4/8.8.8.8/tcp/0")


def test_dial_policy_rejects_unknown_scope_names() -> None:
    with pytest.raises(AddressError, match="unknown address scopes"):
        DialPolicy(frozenset({"publik"}))


def test_filter_drops_other_peers_and_refused_scopes_and_duplicates() -> None:
    given_addrs = [
        "/ip4/198.51.100.11/tcp/4001/p2p/" + PEER_B,
        "/ip4/198.51.100.12/tcp/4001/p2p/" + PEER_A,  # names another peer
        "/ip4/0.0.0.0/tcp/4001",
        "/ip4/127.0.0.1/tcp/4001",
        "garbage",
        "/ip4/198.51.100.11/tcp/4001",  # duplicate of the first
        "/ip4/203.0.113.7/tcp/4001",
    ]
    out = DEFAULT.filter(given_addrs, PEER_B)
    assert [str(m) for m in out] == ["/ip4/198.51.100.11/tcp/4001", "/ip4/203.0.113.7/tcp/4001"]


def test_filter_caps_per_peer_and_scans_a_bounded_prefix() -> None:
    many = [f"/ip4/203.0.113.{i}/tcp/4001" for i in range(200)]
    assert len(DEFAULT.filter(many, PEER_A)) == addrs.MAX_DIAL_ADDRS_PER_PEER
    junk = ["garbage"] * addrs.MAX_CANDIDATES_SCANNED + ["/ip4/203.0.113.1/tcp/4001"]
    assert DEFAULT.filter(junk, PEER_A) == []

    def endless():
        while True:
            yield "x" * 10_000

    t0 = time.perf_counter()
    assert DEFAULT.filter(endless(), PEER_A) == []
    assert time.perf_counter() - t0 < 5


# ------------------------------------------------------------- the host's interfaces
IF_INET6 = """\
00000000000000000000000000000001 01 80 10 80       lo
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
fd000000000000000000000000000002 04 40 00 82     eth0
20010db8000000000000000000000010 05 40 00 c0     eth1
20010db8000000000000000000000011 05 40 00 08     eth1
garbage line
zz0000000000000000000000000000zz 05 40 00 00     eth1
"""


def test_parse_if_inet6_skips_tentative_failed_and_malformed_lines() -> None:
    assert addrs.parse_if_inet6(IF_INET6) == [
        ("lo", ip("::1")),
        ("eth0", ip("fe80::fc:ff:fe00:1")),
        ("eth0", ip("fd00::2")),  # 0x82: permanent | nodad, usable
    ]


def test_parse_ifconf_reads_ifreq_records() -> None:
    def ifreq(name: str, family: int, addr: str) -> bytes:
        sa = struct.pack("H", family) + b"\0\0" + ipaddress.IPv4Address(addr).packed
        return (name.encode().ljust(16, b"\0") + sa).ljust(40, b"\0")

    data = ifreq("lo", socket.AF_INET, "127.0.0.1") + ifreq("eth0:1", socket.AF_INET, "10.0.0.2")
    data += ifreq("odd", socket.AF_INET6, "1.2.3.4") + b"\1\2\3"  # other family, torn tail
    assert addrs.parse_ifconf(data, 40) == [("lo", ip("127.0.0.1")), ("eth0:1", ip("10.0.0.2"))]


def test_interface_addresses_lists_this_hosts_addresses() -> None:
    found = addrs.interface_addresses()
    assert all(isinstance(n, str) and isinstance(a, ipaddress._BaseAddress) for n, a in found)
    assert ("lo", ip("127.0.0.1")) in found  # every Linux host (and netns with lo up)


def test_interface_addresses_falls_back_to_the_route_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(_sock: object) -> bytes:
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(addrs, "_ifconf", refuse)
    with caplog.at_level(logging.WARNING, logger="fflnode.p2p.addrs"):
        found = addrs.interface_addresses()
    assert all(name == "default-route" for name, _ in found)
    assert "cannot list network interfaces" in caplog.text
    assert "node.announce" in caplog.text
