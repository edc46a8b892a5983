"""Who may talk to this node: the private-network check, the peer allowlist, and bans.

Owns access control at the one point every libp2p connection passes, inbound and
outbound alike: the transport upgrader's `upgrade_security`, which `install` wraps.
* Private network (psk). py-libp2p XORs the raw TCP bytes with Salsa20 keyed by the psk
  and gives no sign when the keys differ: each side decrypts noise, reads it as a
  multistream length and waits for bytes that never come, so a wrong or missing key
  surfaces only as a 10 s upgrade timeout (per attempt, on both sides). Both ends of a
  connection open with the same 20-byte multistream-select header, so the gate checks
  the first decrypted bytes against it and refuses at the first wrong byte: the
  dialer's typed error and the acceptor's log line come in milliseconds.
* Allowlist. Once Noise has authenticated the remote peer ID, a peer not on
  `access.allow` (when the list is not empty) is closed before any muxer exists, so no
  stream of it ever reaches a handler. libp2p cannot tell the refused dialer why; when
  the gate dials and the peer hangs up right after Noise, `upgrade_connection` (also
  wrapped) says that it may not have us on its allowlist. Pubsub messages whose origin
  or forwarder is not allowed are dropped by `validate_announcement`.
* Bans. Every rejected message that names its sender is an offence (`offence`, fed by
  `Traffic.on_reject`). At `blacklist_after` offences the peer is banned for the rest of
  this process: disconnected, its addresses forgotten, refused at the gate from then on.

Promises: a refused connection never becomes a muxed connection; each refusal is one
WARNING line naming the address (psk) or peer ID (allowlist, ban) the first time and a
debug line after; the gate inspects only the first 20 bytes and then leaves the data
path, so a connection it lets through behaves (and performs) exactly as without it. It
must never block: `offence` is called from any task and only queues the disconnect
that `run` performs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.abc import IHost, IMuxedConn, IRawConnection, ISecureConn
from libp2p.io.exceptions import IOException
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.transport.exceptions import MuxerUpgradeFailure, SecurityUpgradeFailure

from fflnode.errors import FflError

log = logging.getLogger(__name__)

# What both ends of a libp2p TCP connection send first: multistream-select's header,
# varint length 19 then "/multistream/1.0.0\n". With a wrong psk the first decrypted
# byte already differs with probability 255/256; all 20 bytes match by chance 2**-160.
MULTISTREAM_HEADER = b"\x13/multistream/1.0.0\n"
# What py-libp2p 0.8.1 makes of a psk mismatch on its own: its 10 s upgrade timeout.
LIBRARY_PSK_SYMPTOM = "py-libp2p alone reports this as a dial timeout after 10 s or more"
# Every rejection counts towards a ban, truncation and stalls included: an honest peer
# killed mid-transfer truncates once, well under `blacklist_after`, while a member that
# truncates or stalls every round (holding each round up to its deadline) is banned.
# A banned peer's disconnect is local and quick; never let a stuck close hold the gate.
DISCONNECT_TIMEOUT_S = 2.0
# Peers and addresses whose refusal was already logged at WARNING; past this many the
# set starts over (a flood of distinct addresses must not grow memory without bound).
MAX_WARNED = 1024


class AccessRefused(FflError, SecurityUpgradeFailure):
    """A connection the gate refused: wrong or missing psk, not allowed, or banned.

    A SecurityUpgradeFailure too, so py-libp2p's swarm handles it like any failed
    handshake; `cause` is "psk", "allowlist" or "banned" (the metrics label), or "remote"
    on a dialer whose peer closed the connection as soon as it learnt who we are.
    """

    def __init__(self, cause: str, message: str) -> None:
        self.cause = cause
        super().__init__(message)


class _HeaderMismatch(IOException):
    """Raised inside the library's multistream read; the gate turns it into AccessRefused."""


@dataclass
class Ban:
    offences: dict[str, int]  # rejected messages by reason, when the ban fell
    disconnected: bool = False  # set once `run` has closed the peer's connections


@dataclass
class Gate:
    """One node's access policy and its per-peer offence counts."""

    allow: frozenset[ID] = frozenset()  # empty: any peer that passes the psk check
    blacklist_after: int = 20  # offences before a ban (config access.blacklist_after)
    banned: dict[ID, Ban] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)  # refused connections by cause
    offences: dict[ID, dict[str, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.host: IHost | None = None
        self.me: ID | None = None
        self.private = False  # the host encrypts with a psk
        self._warned: set[str] = set()
        self._changed = trio.Event()
        self._bans_in, self._bans_out = trio.open_memory_channel[ID](math.inf)  # one per peer

    @classmethod
    def from_config(cls, allow: Iterable[str], blacklist_after: int) -> Gate:
        """From [access]: `allow` holds base58 peer IDs already validated by the config."""
        return cls(frozenset(ID.from_base58(p) for p in allow), blacklist_after)

    # -- policy --
    def allowed(self, peer: ID) -> bool:
        """Whether `peer` may hold a connection to us and have its messages accepted."""
        if peer == self.me:
            return True
        return peer not in self.banned and (not self.allow or peer in self.allow)

    def validate_announcement(self, forwarder: ID, msg: Any) -> bool:
        """Pubsub topic validator: drop messages whose origin or forwarder is not allowed."""
        origin = ID(msg.from_id)
        for peer in (origin, forwarder):
            if not self.allowed(peer):
                self._warn(
                    f"pubsub:{peer}",
                    "dropped pubsub messages from %s (forwarded by %s): %s",
                    peer,
                    forwarder,
                    "banned" if peer in self.banned else "not on the allowlist",
                )
                return False
        return True

    def offence(self, peer: str, reason: str) -> None:
        """Count a rejected message from `peer` (base58); ban it at `blacklist_after`."""
        try:
            pid = ID.from_base58(peer)
        except ValueError:  # not a peer ID: nothing to ban
            return
        if pid == self.me or pid in self.banned:
            return
        counts = self.offences.setdefault(pid, {})
        counts[reason] = counts.get(reason, 0) + 1
        if sum(counts.values()) < self.blacklist_after:
            return
        self.banned[pid] = Ban(dict(counts))
        del self.offences[pid]
        log.warning(
            "banned peer %s after %d invalid messages (%s): disconnecting it and refusing "
            "it until this node restarts",
            pid,
            sum(counts.values()),
            ", ".join(f"{r} {n}" for r, n in sorted(counts.items())),
        )
        self._bans_in.send_nowait(pid)
        self._notify()

    # -- tasks --
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Carry out bans: disconnect the peer and forget its addresses."""
        task_status.started()
        async for peer in self._bans_out:
            assert self.host is not None, "Gate.run before Gate.install"
            with trio.move_on_after(DISCONNECT_TIMEOUT_S):
                await self.host.disconnect(peer)
            self.host.get_peerstore().clear_addrs(peer)
            self.banned[peer].disconnected = True
            self._notify()

    async def wait_changed(self) -> None:
        """Return at the next refusal, ban or completed disconnect."""
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- the hook --
    def install(self, host: IHost, *, private: bool) -> None:
        """Put the gate in front of `host`'s security upgrade; `private`: it has a psk."""
        self.host, self.me, self.private = host, host.get_id(), private
        upgrader = host.get_network().upgrader  # type: ignore[attr-defined]
        upgrade = upgrader.upgrade_security

        async def upgrade_security(
            raw_conn: IRawConnection, is_initiator: bool, peer_id: ID | None = None
        ) -> ISecureConn:
            checked = _HeaderCheck(raw_conn)
            addr = _addr_of(raw_conn)
            try:
                secure = await upgrade(checked, is_initiator, peer_id)
            except SecurityUpgradeFailure as e:
                if checked.mismatch:
                    raise self._refuse_handshake(addr, is_initiator, peer_id) from e
                raise
            remote = secure.get_remote_peer()
            if not self.allowed(remote):
                await secure.close()
                raise self._refuse_peer(remote, addr, is_initiator)
            return secure

        upgrade_mux = upgrader.upgrade_connection

        async def upgrade_connection(conn: ISecureConn, peer_id: ID) -> IMuxedConn:
            try:
                return await upgrade_mux(conn, peer_id)
            except MuxerUpgradeFailure as e:
                if not conn.is_initiator or not _closed_by_peer(e):
                    raise
                raise AccessRefused(
                    "remote",
                    f"{peer_id} closed the connection right after the Noise handshake: it may "
                    f"not have this node ({self.me}) on its allowlist, or it banned us",
                ) from e

        upgrader.upgrade_security = upgrade_security
        upgrader.upgrade_connection = upgrade_connection

    def _refuse_handshake(self, addr: str, outbound: bool, peer: ID | None) -> AccessRefused:
        if outbound:
            what = (
                f"{peer} at {addr} failed the private-network handshake (wrong or missing "
                "psk: compare access.psk_file on both nodes)"
                if self.private
                else f"{peer} at {addr} did not answer with multistream-select: it may be on a "
                "private network whose psk this node lacks (access.psk_file)"
            )
            return self._refused("psk", f"{what}; {LIBRARY_PSK_SYMPTOM}")
        what = (
            f"peer at {addr} failed the private-network handshake (wrong or missing psk)"
            if self.private
            else f"peer at {addr} did not open with multistream-select: it may use a "
            "private-network key (psk) and this node has none (access.psk_file)"
        )
        self._warn(f"psk:{addr.rsplit('/', 2)[0]}", "refused connection: %s", what)
        return self._refused("psk", what)

    def _refuse_peer(self, peer: ID, addr: str, outbound: bool) -> AccessRefused:
        ban = self.banned.get(peer)
        cause = "banned" if ban else "allowlist"
        why = (
            f"banned after {sum(ban.offences.values())} invalid messages"
            if ban
            else "not on the allowlist (access.allow)"
        )
        what = f"{'dialled ' if outbound else ''}peer {peer} at {addr}: {why}"
        if not outbound:
            self._warn(f"{cause}:{peer}", "refused %s", what)
        return self._refused(cause, f"refused {what}")

    def _refused(self, cause: str, message: str) -> AccessRefused:
        self.refused[cause] = self.refused.get(cause, 0) + 1
        self._notify()
        return AccessRefused(cause, message)

    def _warn(self, key: str, fmt: str, *args: object) -> None:
        """WARNING the first time for `key`, debug after (a retrying peer must not flood)."""
        if key in self._warned:
            log.debug(fmt, *args)
            return
        if len(self._warned) >= MAX_WARNED:
            self._warned.clear()
        self._warned.add(key)
        log.warning(fmt + " (repeats are logged at debug)", *args)


def _closed_by_peer(error: BaseException) -> bool:
    """Whether the connection under a failed negotiation was closed or reset by the peer."""
    e: BaseException | None = error
    while e is not None:
        if isinstance(e, IOException | ConnectionError):
            return True
        e = e.__cause__ or e.__context__
    return False


def refusal(error: BaseException) -> AccessRefused | None:
    """The gate's AccessRefused behind a failed dial, if that is what failed it.

    py-libp2p wraps it: SwarmDialAllFailedError from MultiError(SwarmException from it).
    """
    seen: set[int] = set()
    todo: list[BaseException] = [error]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, AccessRefused):
            return e
        todo += [x for x in (e.__cause__, e.__context__) if x is not None]
        todo += [x for x in getattr(e, "errors", ()) if isinstance(x, BaseException)]
        todo += getattr(e, "exceptions", ())
    return None


class _HeaderCheck(RawConnection):
    """The raw (psk-decrypted) connection, checking that it opens with MULTISTREAM_HEADER.

    Subclasses RawConnection as py-libp2p's own PskConn does; delegates everything. Once
    the header has passed, reads and writes go straight to the wrapped connection (bound
    methods set on the instance), so the bulk data path carries no extra call.
    """

    def __init__(self, conn: IRawConnection) -> None:
        self._conn = conn
        self.is_initiator = getattr(conn, "is_initiator", False)
        self._checked = 0  # header bytes verified so far
        self.mismatch = False
        self.write = conn.write  # type: ignore[method-assign]

    async def read(self, n: int | None = None) -> bytes:
        data = await self._conn.read(n)
        if self._checked < len(MULTISTREAM_HEADER) and data:
            want = MULTISTREAM_HEADER[self._checked : self._checked + len(data)]
            if data[: len(want)] != want:
                self.mismatch = True
                raise _HeaderMismatch("connection does not open with multistream-select")
            self._checked += len(want)
            if self._checked == len(MULTISTREAM_HEADER):
                self.read = self._conn.read  # type: ignore[method-assign]
        return data

    async def close(self) -> None:
        await self._conn.close()

    def get_remote_address(self) -> tuple[str, int] | None:
        return self._conn.get_remote_address()

    def get_transport_addresses(self) -> list[Any]:
        return self._conn.get_transport_addresses()

    def get_connection_type(self) -> Any:
        return self._conn.get_connection_type()


def _addr_of(conn: IRawConnection) -> str:
    try:
        remote = conn.get_remote_address()
    except Exception:  # transports raise assorted types for a socket already gone
        remote = None
    if not remote:
        return "an unknown address"
    host, port = remote[0], remote[1]
    return f"/{'ip6' if ':' in host else 'ip4'}/{host}/tcp/{port}"


__all__ = ["AccessRefused", "Ban", "Gate", "refusal"]
