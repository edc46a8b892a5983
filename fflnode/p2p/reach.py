"""Where this node can be reached, and whom it agrees to dial: fflnode.p2p.addrs bound to a host.

Owns two doors of the libp2p host:
* `Advertiser`, the host's `addrs_factory`: what heartbeats and identify both announce.
  Configured `node.announce` addresses win; otherwise the concrete interface addresses a
  wildcard listen stands for (never 0.0.0.0 or ::), plus the addresses identify reports
  peers saw us at, once OBSERVED_CONFIRMATIONS distinct peers agree (addrs.advertised).
* `AddressGuard`, wrapped around the peerstore's `add_addrs`: every address a peer told
  us (a heartbeat, identify's listen addresses, a signed peer record) enters the address
  book, and is ever dialled, only if the dial policy allows it. By default loopback,
  link-local, unspecified, multicast and malformed addresses learnt from others are
  refused unless this node itself listens on that scope (the testnet listens on
  127.0.0.1); `node.dial_scopes` chooses the rest. Bootstrap addresses from the config
  are trusted as written.

Promise: no address a peer sends makes this node open a connection to a scope the
policy refuses, and the interface table is read at most once per INTERFACES_TTL_S.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import multiaddr
from libp2p.abc import IHost

from fflnode.p2p import addrs

log = logging.getLogger(__name__)

# Interface addresses change rarely (DHCP renewals, a VPN coming up); re-reading the
# kernel's table every 30 s keeps heartbeats current without a syscall per heartbeat.
INTERFACES_TTL_S = 30.0
# host.get_addrs() runs for every pubsub RPC py-libp2p sends (it checks its signed peer
# record against them) and every heartbeat. Recomputing them each time (socket names,
# scopes, multiaddr parsing) was a fifth of an idle node's CPU with 16 nodes on 2
# cores. They change when a listener binds (an empty answer is never kept), when the
# interfaces change (INTERFACES_TTL_S) or with an observation (which clears the cache):
# a second's staleness is harmless.
ADVERTISED_TTL_S = 1.0
# The dial policy depends on the scopes this node listens on, which change as rarely as
# the advertised addresses: it is rebuilt at most once per POLICY_TTL_S. Every address
# a peer tells us is checked against it; rebuilding it per check (interface expansion,
# multiaddr parsing) was 7 % of a node's CPU in a 16-node testnet on 2 cores.
POLICY_TTL_S = ADVERTISED_TTL_S


class Interfaces:
    """This machine's interface addresses, cached for INTERFACES_TTL_S."""

    def __init__(
        self,
        read: Callable[[], list[tuple[str, Any]]] = addrs.interface_addresses,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read, self._clock = read, clock
        self._cached: list[tuple[str, Any]] = []
        self._at = -float("inf")

    def __call__(self) -> list[tuple[str, Any]]:
        now = self._clock()
        if now - self._at >= INTERFACES_TTL_S:
            self._cached, self._at = self._read(), now
        return self._cached


class Advertiser:
    """The host's addrs_factory: the addresses this node tells peers to dial."""

    def __init__(self, announce: Sequence[str], interfaces: Interfaces | None = None) -> None:
        self.announce = addrs.validate_announce(announce)  # AddressError: a ConfigError
        self.interfaces = interfaces or Interfaces()
        self.observed = addrs.ObservedAddrs()
        self.host: IHost | None = None
        self._cached: list[multiaddr.Multiaddr] = []
        self._at = -float("inf")  # time.monotonic() of _cached

    def bind(self, host: IHost) -> None:
        """Attach to `host`: read its bound listen addresses, and hear identify's
        observations of our address (py-libp2p's own manager wants 4 observers and does
        not filter scopes; ours wants OBSERVED_CONFIRMATIONS and does)."""
        self.host = host
        manager = getattr(host, "_observed_addr_manager", None)
        if manager is None:
            return
        record = manager.record_observation

        def record_observation(conn: Any, observed: Any, local: Any) -> None:
            try:
                self.observed.record(conn.muxed_conn.peer_id, observed)
                self._at = -float("inf")
            except Exception as e:  # a peer's report must never break identify
                log.debug("ignored an observed address: %s", type(e).__name__)
            record(conn, observed, local)

        manager.record_observation = record_observation

    def __call__(self, candidates: Iterable[multiaddr.Multiaddr] = ()) -> list[multiaddr.Multiaddr]:
        if self.host is None:
            return []
        now = time.monotonic()
        if self._cached and now - self._at < ADVERTISED_TTL_S:
            return list(self._cached)
        try:
            listen = self.host.get_transport_addrs()
            chosen = addrs.advertised(self.announce, listen, self.interfaces(), self.observed)
        except addrs.AddressError as e:  # not listening yet (port 0), or a stale address
            log.debug("no advertised addresses yet: %s", e)
            return []
        self._cached, self._at = [multiaddr.Multiaddr(a) for a in chosen], now
        return list(self._cached)


class AddressGuard:
    """The dial policy, enforced where addresses enter the peerstore."""

    def __init__(
        self,
        host: IHost,
        *,
        scopes: Iterable[str] = addrs.DEFAULT_DIAL_SCOPES,
        trusted: Iterable[str] = (),
        interfaces: Interfaces | None = None,
    ) -> None:
        self.host = host
        self.scopes = frozenset(scopes)
        self.interfaces = interfaces or Interfaces()
        self.trusted = {self._base(a) for a in trusted}
        self.refused = 0  # addresses kept out of the address book
        self._policy: addrs.DialPolicy | None = None
        self._policy_at = -float("inf")  # time.monotonic() of _policy
        store = host.get_peerstore()
        self._add_addrs = store.add_addrs

        def add_addrs(peer_id: Any, new: Sequence[Any], ttl: int = 0) -> None:
            kept = self.dialable(peer_id, new)
            if kept:
                self._add_addrs(peer_id, kept, ttl)

        store.add_addrs = add_addrs  # type: ignore[method-assign]

    @staticmethod
    def _base(addr: Any) -> str:
        parsed = addrs.parse(addr)
        return parsed.base if parsed is not None else str(addr)

    def policy(self) -> addrs.DialPolicy:
        """The policy now: the configured scopes, plus the scopes this node listens on
        (cached for POLICY_TTL_S once the node listens)."""
        now = time.monotonic()
        if self._policy is not None and now - self._policy_at < POLICY_TTL_S:
            return self._policy
        try:
            own = addrs.expand_listen(self.host.get_transport_addrs(), self.interfaces())
        except addrs.AddressError:
            own = []  # not listening yet
        policy = addrs.DialPolicy.for_listen(own, self.scopes)
        if own:  # before the listener binds, ask again next time
            self._policy, self._policy_at = policy, now
        return policy

    def dialable(self, peer: Any, candidates: Iterable[Any]) -> list[multiaddr.Multiaddr]:
        """The candidates the policy lets this node dial for `peer` (trusted ones
        always); never raises on what a peer sent."""
        cands = list(itertools.islice(candidates, addrs.MAX_CANDIDATES_SCANNED))
        trusted = [
            multiaddr.Multiaddr(self._base(a)) for a in cands if self._base(a) in self.trusted
        ]
        allowed = self.policy().filter(cands, peer)
        kept = list({str(a): a for a in [*trusted, *allowed]}.values())
        self.refused += len(cands) - len(kept)
        return kept


__all__ = ["INTERFACES_TTL_S", "POLICY_TTL_S", "AddressGuard", "Advertiser", "Interfaces"]
