"""Which addresses a node advertises, and which addresses it will dial.

Owns the answer to "where can other machines reach this node?" and "is this address,
learnt from a peer, worth dialling?". A listen address such as /ip4/0.0.0.0/tcp/4001
means "every interface of this machine": sent verbatim in a heartbeat it tells peers to
dial their own machine. This module turns listen addresses into concrete ones, adds the
addresses peers observed us at, and classifies every address by scope.

Promises:
* Everything here is pure (sans-IO) except `interface_addresses`, which reads the
  kernel's interface table and nothing else. No trio, no libp2p host.
* `expand_listen` and `advertised` never return an unspecified address (0.0.0.0, ::).
* An address from a peer (heartbeat, identify) is hostile: classifying, recording or
  filtering it never raises; a bad one is refused with a reason. Only configured
  addresses (`announce`, the node's own listen addresses) raise, as AddressError, a
  ConfigError, so the daemon reports them as one line and exits 2.
* Every list taken from outside is read up to a named cap, and every list returned is
  capped; ObservedAddrs holds a bounded number of peers and addresses.

Must never: dial, resolve DNS, or advertise an address that names no interface of this
machine unless the operator configured it (`announce`) or peers confirmed it.
"""

from __future__ import annotations

import array
import fcntl
import ipaddress
import itertools
import logging
import re
import socket
import struct
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import multiaddr

from fflnode import wire
from fflnode.errors import ConfigError

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Scopes `scope()` returns. "dns" is not an IP scope: a /dns, /dns4 or /dns6 name is
# resolved by the dialler, so its scope is unknown here (a name can point anywhere).
UNSPECIFIED = "unspecified"
LOOPBACK = "loopback"
LINK_LOCAL = "link-local"
PRIVATE = "private"
PUBLIC = "public"
MULTICAST = "multicast"
DOCUMENTATION = "documentation"
DNS = "dns"
INVALID = "invalid"
SCOPES = frozenset(
    {UNSPECIFIED, LOOPBACK, LINK_LOCAL, PRIVATE, PUBLIC, MULTICAST, DOCUMENTATION, DNS, INVALID}
)

# Peers' addresses in these scopes are dialled by default. Documentation ranges (RFC 5737,
# RFC 3849) are never routed on the internet, so an address there is a test network's
# (the netns harness uses 198.51.100.0/24): dial it as a private one.
DEFAULT_DIAL_SCOPES = frozenset({PUBLIC, PRIVATE, DOCUMENTATION, DNS})
# Scopes a node may dial only because it listens in that scope itself: a peer's loopback
# address names the peer's machine, which is ours only when we share one (the testnet on
# 127.0.0.1). Unspecified, multicast and invalid addresses are never dialled: listening
# on 0.0.0.0 does not make 0.0.0.0 a peer's address.
OWN_SCOPE_EXTENSIONS = frozenset({LOOPBACK, LINK_LOCAL})
# The order `advertised` lists addresses in: py-libp2p 0.8.1 dials only the first TCP
# address of a peer it knows (swarm.dial_peer keeps one address per transport class), so
# the most widely reachable goes first.
SCOPE_PREFERENCE = (PUBLIC, DNS, PRIVATE, DOCUMENTATION, LINK_LOCAL, LOOPBACK)

# The heartbeat carries at most this many addresses (wire.MAX_ADDRS).
MAX_ADVERTISED = wire.MAX_ADDRS
# Confirmed observed addresses advertised at most: a NAT gives a host one or two external
# addresses per family; more is two colluding peers inventing some. They get reserved
# slots so a host with many interfaces still advertises the address the internet sees.
MAX_OBSERVED_ADVERTISED = 4
# Distinct peers that must report the same observed address before it is advertised: one
# peer alone may lie or sit behind the same NAT quirk (go-libp2p uses 4 for the open
# internet; a run of a handful of nodes needs a smaller bar).
OBSERVED_CONFIRMATIONS = 2
# Observing peers remembered: a run has at most wire.MAX_MEMBERS nodes. When full, the
# peer heard from least recently is forgotten first.
MAX_OBSERVERS = wire.MAX_MEMBERS
# Observations kept per peer: one per connection family (IPv4, IPv6) and a spare for a
# reconnect that changed the NAT mapping; the oldest is dropped first.
MAX_OBSERVED_PER_PEER = 4
# Addresses of one peer a DialPolicy passes on: a host with a public, a private and a
# documentation address on both families has 6; each unreachable one can cost a dial
# timeout, so a peer cannot make us try more than 8.
MAX_DIAL_ADDRS_PER_PEER = 8
# Entries of a peer-supplied list looked at, at most: four heartbeats' worth. A longer
# list is cut, never scanned whole.
MAX_CANDIDATES_SCANNED = 4 * wire.MAX_ADDRS
# The longest address string parsed: /dns4/ with a 253-character name, /tcp/65535 and a
# /p2p/ peer ID fit in 400; anything longer is refused before multiaddr parses it.
MAX_ADDR_CHARS = 512
# Interface addresses considered, at most: a container host with hundreds of veths has a
# few hundred; the cap bounds the scan and the expansion, not a real machine.
MAX_INTERFACE_ADDRS = 1024

# Networks by scope, beyond what `ipaddress` flags itself.
_DOCUMENTATION_NETS = tuple(
    ipaddress.ip_network(n)
    for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
)
_PRIVATE_NETS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "10.0.0.0/8",  # RFC 1918
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",  # RFC 6598 carrier-grade NAT: reachable inside the carrier
        "fc00::/7",  # RFC 4193 unique local
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: a public IPv4 behind a NAT64
_IP_PROTOCOLS = ("ip4", "ip6")
_DNS_PROTOCOLS = ("dns", "dns4", "dns6")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+$")


class AddressError(ConfigError):
    """A configured address (node.listen, node.announce) cannot be used as one."""


# ------------------------------------------------------------------------ parsing
@dataclass(frozen=True)
class TcpAddr:
    """A parsed /ip4|/ip6|/dns* + /tcp address, with an optional trailing /p2p/ peer ID."""

    proto: str  # ip4, ip6, dns, dns4, dns6
    host: str  # the IP as multiaddr prints it, or the DNS name
    port: int
    peer: str | None

    @property
    def base(self) -> str:
        """The address without its /p2p/ component."""
        return f"/{self.proto}/{self.host}/tcp/{self.port}"

    @property
    def ip(self) -> IPAddress | None:
        return ipaddress.ip_address(self.host) if self.proto in _IP_PROTOCOLS else None


def parse(maddr: Any) -> TcpAddr | None:
    """`maddr` (a string or Multiaddr) as a TcpAddr; None for anything else, never raises."""
    try:
        if isinstance(maddr, str):
            if len(maddr) > MAX_ADDR_CHARS:
                return None
            maddr = multiaddr.Multiaddr(maddr)
        if not isinstance(maddr, multiaddr.Multiaddr):
            return None
        items = list(itertools.islice(maddr.items(), 4))
        names = [p.name for p, _ in items]
        if len(items) not in (2, 3) or names[1] != "tcp" or names[2:] not in ([], ["p2p"]):
            return None
        (first, host), (_, port) = items[0], items[1]
        if first.name in _IP_PROTOCOLS:
            host = str(ipaddress.ip_address(host))
        elif first.name not in _DNS_PROTOCOLS or not _HOSTNAME.match(host or ""):
            return None
        return TcpAddr(first.name, host, int(port), items[2][1] if len(items) == 3 else None)
    except Exception:  # multiaddr raises assorted types on bad input
        return None


def ip_scope(ip: IPAddress) -> str:
    """The scope of one IP address (see `scope`)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:127.0.0.1 reaches 127.0.0.1
            return ip_scope(ip.ipv4_mapped)
        if ip in _NAT64:  # 64:ff9b::a.b.c.d is worth dialling only if a.b.c.d is public
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
            return PUBLIC if ip_scope(embedded) == PUBLIC else INVALID
    if ip.is_unspecified:
        return UNSPECIFIED
    if ip.is_loopback:
        return LOOPBACK
    if ip.is_link_local:
        return LINK_LOCAL
    if ip.is_multicast:
        return MULTICAST
    if any(ip in net for net in _DOCUMENTATION_NETS):
        return DOCUMENTATION
    if any(ip in net for net in _PRIVATE_NETS):
        return PRIVATE
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return INVALID  # fec0::/10, deprecated by RFC 3879
    if ip.is_global and not ip.is_reserved:
        return PUBLIC
    return INVALID  # 0.x.x.x, 240/4, broadcast, benchmarking, IPv4-compatible IPv6 ...


def scope(maddr: Any) -> str:
    """One of SCOPES for a /ip4|/ip6 + /tcp address (a trailing /p2p/ is allowed).

    "dns" for a /dns|/dns4|/dns6 + /tcp name, except localhost names (RFC 6761), which
    are "loopback"; "invalid" for anything else, including strings that do not parse.
    The port is not judged here (a configured listen port may be 0).
    """
    a = parse(maddr)
    if a is None:
        return INVALID
    if a.ip is None:
        name = a.host.lower().rstrip(".")
        return LOOPBACK if name == "localhost" or name.endswith(".localhost") else DNS
    return ip_scope(a.ip)


# ------------------------------------------------------------- the host's interfaces
SIOCGIFCONF = 0x8912  # linux/sockios.h
SIOCGIFFLAGS = 0x8913
IFF_UP = 0x1
IFNAMSIZ = 16
IF_INET6 = Path("/proc/net/if_inet6")
# struct ifreq: a 16-byte name and a 24-byte union on 64-bit Linux (16 on 32-bit).
IFREQ_BYTES = 40 if struct.calcsize("P") == 8 else 32
# SIOCGIFCONF buffer: starts with room for 100 addresses and doubles while the kernel
# fills it, up to MAX_INTERFACE_ADDRS entries.
IFCONF_START_BYTES = 100 * IFREQ_BYTES
IFCONF_MAX_BYTES = MAX_INTERFACE_ADDRS * IFREQ_BYTES
# /proc/net/if_inet6 lines are ~55 bytes: this is MAX_INTERFACE_ADDRS of them with room.
IF_INET6_MAX_BYTES = 128 * MAX_INTERFACE_ADDRS
# IPv6 address flags (linux/if_addr.h) of addresses not usable yet or ever.
IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40
# Where the fallback asks the routing table for the default source address: a UDP
# "connect" sends nothing; documentation addresses, so no real host is ever named.
ROUTE_PROBES = ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1"))


def parse_ifconf(data: bytes, ifreq_bytes: int = IFREQ_BYTES) -> list[tuple[str, IPAddress]]:
    """The (interface, IPv4 address) pairs of a SIOCGIFCONF result (an array of ifreq)."""
    out: list[tuple[str, IPAddress]] = []
    for off in range(0, len(data) - ifreq_bytes + 1, ifreq_bytes):
        name = data[off : off + IFNAMSIZ].split(b"\0", 1)[0].decode("ascii", "replace")
        (family,) = struct.unpack_from("H", data, off + IFNAMSIZ)  # sockaddr_in, host order
        if family == socket.AF_INET:
            out.append((name, ipaddress.IPv4Address(data[off + 20 : off + 24])))
    return out[:MAX_INTERFACE_ADDRS]


def parse_if_inet6(text: str) -> list[tuple[str, IPAddress]]:
    """The (interface, IPv6 address) pairs of /proc/net/if_inet6, usable ones only.

    A line is: address (32 hex digits), ifindex, prefix length, scope, flags, name.
    Tentative addresses (duplicate detection still running) and failed ones are skipped.
    """
    out: list[tuple[str, IPAddress]] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 6 or len(fields[0]) != 32:
            continue
        try:
            ip = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
            flags = int(fields[4], 16)
        except ValueError:
            continue
        if not flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED):
            out.append((fields[5], ip))
        if len(out) >= MAX_INTERFACE_ADDRS:
            break
    return out


def _ifconf(sock: socket.socket) -> bytes:
    size = IFCONF_START_BYTES
    while True:
        buf = array.array("B", bytes(size))
        req = struct.pack("iP", size, buf.buffer_info()[0])
        used = struct.unpack("iP", fcntl.ioctl(sock.fileno(), SIOCGIFCONF, req))[0]
        if used + IFREQ_BYTES <= size or size >= IFCONF_MAX_BYTES:
            return buf.tobytes()[:used]
        size = min(2 * size, IFCONF_MAX_BYTES)


def _is_up(sock: socket.socket, name: str) -> bool:
    device = name.split(":", 1)[0].encode()[: IFNAMSIZ - 1]  # "eth0:1" is an alias label
    try:
        res = fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, struct.pack(f"{IFREQ_BYTES}s", device))
    except OSError:
        return True  # gone or unknown: let the caller's dial find out
    return bool(struct.unpack_from("H", res, IFNAMSIZ)[0] & IFF_UP)


def _route_probe() -> list[tuple[str, IPAddress]]:
    out: list[tuple[str, IPAddress]] = []
    for family, target in ROUTE_PROBES:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((target, 9))
                out.append(("default-route", ipaddress.ip_address(s.getsockname()[0])))
        except OSError:
            continue
    return out


def interface_addresses() -> list[tuple[str, IPAddress]]:
    """(interface name, address) for every address of an interface that is up, IPv4 first.

    Linux only, no dependencies: IPv4 from the SIOCGIFCONF ioctl, IPv6 from
    /proc/net/if_inet6, each interface's IFF_UP from SIOCGIFFLAGS. Loopback and link-local
    addresses are included (`expand_listen` decides). Where the kernel interfaces are not
    available (another OS, a seccomp filter) it falls back to the source address the
    routing table picks for each family, named "default-route", and logs a warning
    saying so; with no route either the list holds what was found, possibly nothing.
    Never raises.
    """
    found: list[tuple[str, IPAddress]] = []
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            v4 = parse_ifconf(_ifconf(s))
            try:
                with IF_INET6.open("rb") as f:
                    v6 = parse_if_inet6(f.read(IF_INET6_MAX_BYTES).decode("ascii", "replace"))
            except OSError as e:  # IPv6 disabled: no file
                v6 = []
                log.debug("no IPv6 interface addresses: %s", e)
            found = [(name, ip) for name, ip in v4 + v6 if _is_up(s, name)]
    except (OSError, struct.error) as e:
        found = _route_probe()
        log.warning(
            "cannot list network interfaces (SIOCGIFCONF: %s); using the default route's "
            "source addresses instead: %s. Set node.announce if peers cannot reach this node.",
            e,
            ", ".join(str(ip) for _, ip in found) or "none",
        )
    return found[:MAX_INTERFACE_ADDRS]


# --------------------------------------------------------------------- advertising
def _tcp(ip: IPAddress, port: int) -> str:
    return f"/{'ip4' if ip.version == 4 else 'ip6'}/{ip}/tcp/{port}"


def _rank(addr: str) -> int:
    s = scope(addr)
    return SCOPE_PREFERENCE.index(s) if s in SCOPE_PREFERENCE else len(SCOPE_PREFERENCE)


def _as_ip(value: Any) -> IPAddress:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise AddressError(f"interface address {value!r} is not an IP address") from None


def expand_listen(
    listen: Iterable[Any], interfaces: Iterable[tuple[str, Any]]
) -> list[multiaddr.Multiaddr]:
    """The concrete addresses behind the node's bound listen addresses.

    `listen`: the addresses the host actually listens on (`host.get_transport_addrs()`,
    ports resolved), strings or Multiaddrs; a port of 0 is an AddressError (pass the bound
    addresses, not the configured ones). `interfaces`: `interface_addresses()` or a
    stand-in.

    A concrete listen address is kept as it is (its /p2p/ component dropped). A wildcard
    (0.0.0.0 or ::) becomes one address per interface address of its family whose scope
    is public, private or documentation; link-local addresses are left out (they need a
    zone to dial) and so is loopback. Loopback is added back only when the whole result
    would otherwise be empty: a machine with no network still reaches itself, while a
    networked one never tells peers to dial their own loopback. The result is
    deduplicated, in listen order then interface order, and never holds an unspecified
    address.
    """
    ifaces = [(str(n), _as_ip(ip)) for n, ip in itertools.islice(interfaces, MAX_INTERFACE_ADDRS)]
    out: list[str] = []
    fallback: list[str] = []  # loopback expansions, used only if nothing else is found
    for entry in listen:
        a = parse(entry)
        if a is None or a.ip is None:
            raise AddressError(
                f"listen address {str(entry)[:MAX_ADDR_CHARS]!r} is not /ip4|/ip6 + /tcp"
            )
        if a.port == 0:
            raise AddressError(
                f"listen address {a.base} has port 0: expand the bound addresses "
                "(host.get_transport_addrs()), not the configured ones"
            )
        if not a.ip.is_unspecified:
            out.append(_tcp(a.ip, a.port))
            continue
        for _, ip in ifaces:
            if ip.version != a.ip.version:
                continue
            s = ip_scope(ip)
            if s in (PUBLIC, PRIVATE, DOCUMENTATION):
                out.append(_tcp(ip, a.port))
            elif s == LOOPBACK:
                fallback.append(_tcp(ip, a.port))
    chosen = out or fallback
    return [multiaddr.Multiaddr(s) for s in dict.fromkeys(chosen)]


def validate_announce(announce: Iterable[Any]) -> list[str]:
    """Configured `node.announce` addresses, checked; AddressError names the bad one.

    Each must be /ip4|/ip6|/dns|/dns4|/dns6 + /tcp with a port other than 0, optionally
    ending in /p2p/<peer id>, and must not be unspecified; at most MAX_ADVERTISED.
    Returned verbatim (stripped of surrounding blanks), duplicates dropped.
    """
    out: list[str] = []
    for i, entry in enumerate(announce):
        text = str(entry).strip()
        if i >= MAX_ADVERTISED:
            raise AddressError(
                f"node.announce lists more than {MAX_ADVERTISED} addresses "
                "(a heartbeat carries at most that many)"
            )
        a = parse(text)
        if a is None:
            raise AddressError(
                f"node.announce[{i}] {text[:MAX_ADDR_CHARS]!r} must be "
                "/ip4|/ip6|/dns4|/dns6/HOST/tcp/PORT (optionally /p2p/PEER)"
            )
        if a.port == 0:
            raise AddressError(f"node.announce[{i}] {text!r} has port 0: name the real port")
        if scope(a.base) == UNSPECIFIED:
            raise AddressError(
                f"node.announce[{i}] {text!r} is unspecified: peers would dial their own "
                "machine; name this machine's reachable address"
            )
        out.append(text)
    return list(dict.fromkeys(out))


def advertised(
    announce: Iterable[Any],
    listen_actual: Iterable[Any],
    interfaces: Iterable[tuple[str, Any]],
    observed: ObservedAddrs | None = None,
) -> list[str]:
    """The addresses to put in heartbeats, without /p2p/ unless `announce` has one.

    Configured `announce` wins verbatim (checked by `validate_announce`). Otherwise the
    expanded listen addresses, then up to MAX_OBSERVED_ADVERTISED observed addresses
    confirmed by OBSERVED_CONFIRMATIONS distinct peers; each group ordered by
    SCOPE_PREFERENCE (public first: py-libp2p dials a peer's first TCP address only),
    stably. At most MAX_ADVERTISED, with the observed addresses' slots reserved.
    """
    fixed = validate_announce(announce)
    if fixed:
        return fixed
    local = sorted((str(m) for m in expand_listen(listen_actual, interfaces)), key=_rank)
    seen = set(local)
    extra = [a for a in (observed.confirmed() if observed else []) if a not in seen]
    extra = sorted(extra[:MAX_OBSERVED_ADVERTISED], key=_rank)
    return local[: MAX_ADVERTISED - len(extra)] + extra


# ------------------------------------------------------------- observed addresses
# Scopes an observed address may have to be worth advertising. Documentation addresses
# count so the netns harness can exercise confirmation.
OBSERVABLE_SCOPES = frozenset({PUBLIC, PRIVATE, DOCUMENTATION})


def observation_refusal(observed: Any) -> str:
    """Why an address a peer says it saw us at is not worth recording; "" when it is."""
    return _observation_refusal(parse(observed))


def _observation_refusal(a: TcpAddr | None) -> str:
    if a is None or a.ip is None:
        return "not an /ip4|/ip6 + /tcp address"
    if a.port == 0:
        return "port 0"
    s = ip_scope(a.ip)
    if s not in OBSERVABLE_SCOPES:
        return f"{s} address: no other machine can reach us there"
    return ""


class ObservedAddrs:
    """Addresses peers report seeing us at (libp2p identify's observed_addr), bounded.

    A peer's vote counts once per address however often it repeats it; an address is
    confirmed when OBSERVED_CONFIRMATIONS distinct peers reported it. Addresses are
    compared exactly (IP and port): an outbound connection shows an ephemeral port that
    differs per connection, so only a stable mapping (inbound connections to our listen
    port, an endpoint-independent NAT) ever gets confirmed, which is what makes an
    address worth advertising. Memory: at most MAX_OBSERVERS peers x
    MAX_OBSERVED_PER_PEER addresses; the peer heard from least recently goes first.
    """

    def __init__(
        self,
        min_peers: int = OBSERVED_CONFIRMATIONS,
        max_peers: int = MAX_OBSERVERS,
        max_per_peer: int = MAX_OBSERVED_PER_PEER,
    ) -> None:
        if min_peers < 1 or max_peers < 1 or max_per_peer < 1:
            raise ValueError("ObservedAddrs limits must be at least 1")
        self.min_peers = min_peers
        self.max_peers = max_peers
        self.max_per_peer = max_per_peer
        # peer -> its observed addresses, oldest first; peers least recently heard first
        self._by_peer: OrderedDict[str, OrderedDict[str, None]] = OrderedDict()

    def record(self, peer: Any, observed: Any) -> bool:
        """Note that `peer` saw us at `observed`; False (and nothing kept) if refused."""
        a = parse(observed)
        if a is None or a.ip is None or _observation_refusal(a):
            return False
        addr, key = _tcp(a.ip, a.port), str(peer)
        seen = self._by_peer.pop(key, None)
        if seen is None:
            seen = OrderedDict()
            while len(self._by_peer) >= self.max_peers:
                self._by_peer.popitem(last=False)
        seen.pop(addr, None)
        seen[addr] = None
        while len(seen) > self.max_per_peer:
            seen.popitem(last=False)
        self._by_peer[key] = seen  # most recently heard last
        return True

    def forget(self, peer: Any) -> None:
        """Drop a peer's observations (it disconnected: they may no longer hold)."""
        self._by_peer.pop(str(peer), None)

    def confirmed(self) -> list[str]:
        """Addresses reported by at least `min_peers` distinct peers, most-confirmed first."""
        votes: dict[str, int] = {}
        for seen in self._by_peer.values():
            for addr in seen:
                votes[addr] = votes.get(addr, 0) + 1
        good = [a for a, n in votes.items() if n >= self.min_peers]
        return sorted(good, key=lambda a: -votes[a])  # stable: first reported first

    def __len__(self) -> int:
        """Peers whose observations are held."""
        return len(self._by_peer)

    def held(self) -> int:
        """Observations held, over all peers."""
        return sum(len(seen) for seen in self._by_peer.values())


# --------------------------------------------------------------------- dialling
@dataclass(frozen=True)
class DialPolicy:
    """Which of the addresses peers advertise this node dials.

    `allowed_scopes`: scopes dialled from any peer (default: public, private,
    documentation, dns). `own_listen_scopes`: the scopes of this node's own concrete
    listen addresses; loopback and link-local join the allowed scopes only through it
    (a node listening on 127.0.0.1 shares its machine with its peers, as in the testnet).
    Unspecified, multicast and invalid addresses and port 0 are always refused.
    """

    allowed_scopes: frozenset[str] = DEFAULT_DIAL_SCOPES
    own_listen_scopes: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        unknown = (set(self.allowed_scopes) | set(self.own_listen_scopes)) - SCOPES
        if unknown:
            raise AddressError(
                f"unknown address scopes {sorted(unknown)} (known: {sorted(SCOPES)})"
            )

    @classmethod
    def for_listen(
        cls, own_addrs: Iterable[Any], allowed_scopes: frozenset[str] = DEFAULT_DIAL_SCOPES
    ) -> DialPolicy:
        """The policy of a node that advertises (or concretely listens on) `own_addrs`.

        Pass concrete addresses (`expand_listen`'s result): a wildcard listen has scope
        "unspecified", which extends nothing.
        """
        return cls(frozenset(allowed_scopes), frozenset(scope(a) for a in own_addrs))

    @property
    def dialable(self) -> frozenset[str]:
        extra = self.own_listen_scopes & OWN_SCOPE_EXTENSIONS
        return (self.allowed_scopes | extra) - {UNSPECIFIED, MULTICAST, INVALID}

    def why_not(self, maddr: Any) -> str:
        """Why `maddr` is not dialled; "" when it is."""
        a = parse(maddr)
        if a is None:
            return "not an /ip4|/ip6|/dns* + /tcp address"
        if a.port == 0:
            return f"{a.base}: port 0 cannot be dialled"
        s = scope(a.base)
        if s in self.dialable:
            return ""
        if s in OWN_SCOPE_EXTENSIONS:
            return (
                f"{a.base}: a peer's {s} address names the peer's own machine; dialled only "
                f"when this node listens on a {s} address itself"
            )
        return f"{a.base}: {s} addresses are not dialled"

    def allows(self, maddr: Any) -> bool:
        return not self.why_not(maddr)

    def filter(self, addrs: Iterable[Any], peer_id: Any) -> list[multiaddr.Multiaddr]:
        """The addresses of `peer_id` worth dialling, in the order given, deduplicated.

        Drops addresses this policy refuses and those whose /p2p/ component names
        another peer; reads at most MAX_CANDIDATES_SCANNED entries and returns at most
        MAX_DIAL_ADDRS_PER_PEER. Never raises on what a peer sent.
        """
        want = str(peer_id)
        out: dict[str, multiaddr.Multiaddr] = {}
        for entry in itertools.islice(addrs, MAX_CANDIDATES_SCANNED):
            a = parse(entry)
            if a is None or (a.peer is not None and a.peer != want) or self.why_not(a.base):
                continue
            if a.base not in out:
                out[a.base] = multiaddr.Multiaddr(a.base)
            if len(out) >= MAX_DIAL_ADDRS_PER_PEER:
                break
        return list(out.values())


__all__ = [
    "AddressError",
    "DialPolicy",
    "ObservedAddrs",
    "TcpAddr",
    "advertised",
    "expand_listen",
    "interface_addresses",
    "observation_refusal",
    "parse",
    "scope",
    "validate_announce",
]
