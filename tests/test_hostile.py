"""Hostile input and admission (issue 10): bounded logs, pubsub that survives garbage,
validation before forwarding, and a run descriptor that keeps strangers out.

The pure pieces (PeerLog, Admission) are driven directly; the rest runs on real libp2p
hosts on 127.0.0.1 with the node's own wiring: Traffic counting into a Gate, the
membership's validator on the run topic, GuardedPubsub.
"""

from __future__ import annotations

import logging
import os
from contextlib import AsyncExitStack, suppress

import multiaddr
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.tools.anyio_service import background_trio_service

from fflnode import admission, wire
from fflnode.p2p import bulk, streams
from fflnode.p2p.bulk import Traffic
from fflnode.p2p.gate import Gate
from fflnode.p2p.host import build_host, build_pubsub, close_host, running_host
from fflnode.p2p.membership import Membership, announce_topic
from fflnode.p2p.peerlog import PeerLog

RUN = "hostile-run"
LISTEN = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
WAIT_S = 20.0  # any bounded wait below: milliseconds on 127.0.0.1, loaded machine aside
PEER_A = "12D3KooWPeerA000000000000000000000000000000000000"
PEER_B = "12D3KooWPeerB000000000000000000000000000000000000"


# ----------------------------------------------------------------------------- PeerLog
class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_peer_log_writes_one_line_per_window_then_says_how_many_it_held(caplog):
    clock = Clock()
    plog = PeerLog(logging.getLogger("test.peerlog"), window_s=60, clock=clock)
    with caplog.at_level(logging.WARNING, logger="test.peerlog"):
        for i in range(16_000):
            clock.now = i * 10 / 16_000  # 16,000 lines in 10 s
            plog.log(PEER_A, "ack-refused", "x" * 4096)
        plog.log(PEER_B, "schema", "another peer gets its own line")
        clock.now = 61.0
        plog.log(PEER_A, "schema", "the window passed")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert all(len(line) < 400 for line in lines)  # a 4 KB reason is cut
    assert "15999 similar lines held back: ack-refused 15999" in lines[2]
    assert plog.written == 3 and plog.suppressed == 15_999


def test_peer_log_memory_is_bounded_by_evicting_the_oldest_peer():
    clock = Clock()
    plog = PeerLog(logging.getLogger("test.peerlog"), max_peers=4, clock=clock)
    for i in range(100):
        plog.log(f"peer{i}", "schema", "x")
    assert len(plog._peers) == 4


# --------------------------------------------------------------------------- Admission
GROUPS = {
    "seed": 1,
    "size": [4, 600],
    "topology": ["complete", 0],
    "task": ["digits", "ssd"],
    "layout": [["w", [3, 4]]],
    "recipe": [1, 32, "sgd", 0.1],
    "exchange": ["none"],
    "merge": [0, 0],
}


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_admission_refuses_a_peer_whose_group_differs_and_names_it(group: str) -> None:
    ours = admission.Admission(GROUPS)
    theirs = admission.Admission({**GROUPS, group: ["something else"]})
    refusal = ours.check(b"peer", theirs.descriptor, None)
    assert refusal is not None and refusal.field == group
    assert admission.GROUP_MEANING[group] in refusal.text
    assert ours.check(b"peer", admission.Admission(GROUPS).descriptor, None) is None


def test_admission_refuses_missing_and_unknown_groups() -> None:
    ours = admission.Admission(GROUPS)
    partial = {k: v for k, v in ours.descriptor.items() if k != "layout"}
    assert ours.check(b"p", partial, None).field == "layout"
    assert ours.check(b"p", {**ours.descriptor, "zzz": b"\0" * 8}, None).field == "zzz"


def test_a_closed_run_admits_only_holders_of_the_secret_under_their_own_id() -> None:
    secret = os.urandom(32)
    ours = admission.Admission(GROUPS, secret)
    holder = admission.Admission(GROUPS, secret).heartbeat_fields(b"holder")
    assert ours.check(b"holder", holder["admit"], holder["proof"]) is None
    assert ours.check(b"holder", holder["admit"], None).field == "secret"
    # a proof lifted from another peer's heartbeat is worthless under a different ID
    assert ours.check(b"thief", holder["admit"], holder["proof"]).field == "secret"
    stranger = admission.Admission(GROUPS, os.urandom(32)).heartbeat_fields(b"stranger")
    assert ours.check(b"stranger", stranger["admit"], stranger["proof"]).field == "secret"


def test_a_run_secret_file_must_hold_64_hex_characters() -> None:
    assert len(admission.parse_secret("ab" * 32 + "\n", "f")) == 32
    for bad in ("", "ab" * 31, "zz" * 32, "ab" * 33):
        with pytest.raises(ValueError, match="64 hex characters"):
            admission.parse_secret(bad, "f")


# ------------------------------------------------------------------- real-host helpers
async def start_host(stack: AsyncExitStack, traffic: Traffic, gate: Gate | None = None):
    host = build_host(create_new_key_pair(), gate=gate)
    # All on 127.0.0.1: the one-IP settings a testnet uses. The production colocation
    # threshold (3 per IP) scores a fourth local peer out of the mesh, and its heartbeats
    # never reach us (pubsub does not replay its cache to late subscribers).
    pubsub, router = build_pubsub(
        host,
        3,
        lambda peer, reason, detail: traffic.reject(reason, peer, detail),
        mesh_diversity_ips=1,
        ip_colocation_threshold=64,
    )
    await stack.enter_async_context(running_host(host, LISTEN))
    await stack.enter_async_context(background_trio_service(pubsub))
    await stack.enter_async_context(background_trio_service(router))
    stack.push_async_callback(close_host, host)
    await pubsub.wait_until_ready()
    return host, pubsub


async def connect(a, b) -> None:
    await a.connect(info_from_p2p_addr(b.get_addrs()[0]))


async def until(predicate, timeout_s: float = WAIT_S) -> None:
    with trio.fail_after(timeout_s):
        while not predicate():
            await trio.sleep(0.01)  # polling a condition under a deadline


# ------------------------------------------------------------------------ log flooding
async def test_a_flood_of_ack_refusals_writes_a_few_lines_and_bans_the_sender(caplog):
    """16,000 `ack ok=false` with 4 KB reasons wrote 58 MB of log and banned nobody."""
    caplog.set_level(logging.DEBUG)
    async with AsyncExitStack() as stack:
        gate = Gate(blacklist_after=20)
        traffic = Traffic(on_reject=gate.offence)
        victim, _ = await start_host(stack, traffic, gate)
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        await nursery.start(gate.run)

        async def resolve(peer: str, msg: wire.Message) -> bulk.Resolved:
            raise bulk.Unavailable("not-ready", "nothing to serve")

        async def handle(stream) -> None:
            await bulk.serve(stream, "/fflnode/shard/1.0.0", RUN, resolve, traffic)

        victim.set_stream_handler("/fflnode/shard/1.0.0", handle)
        attacker, _ = await start_host(stack, Traffic())
        await connect(attacker, victim)
        caplog.clear()
        ack = wire.frame(wire.encode("ack", ok=False, reason="x" * 4000))
        sent = 0
        with trio.move_on_after(WAIT_S):
            stream = await attacker.new_stream(victim.get_id(), ["/fflnode/shard/1.0.0"])
            try:
                for _ in range(16_000):
                    await stream.write(ack)
                    sent += 1
            except streams.STREAM_ERRORS:
                pass  # the ban closed the connection
        await until(lambda: attacker.get_id() in gate.banned)
        fflnode_lines = [r for r in caplog.records if r.name.startswith("fflnode")]
        fflnode_lines = [r for r in fflnode_lines if r.levelno >= logging.INFO]
        assert traffic.rejected.get("ack-refused", 0) >= 20
        assert len(fflnode_lines) <= 3, [r.getMessage()[:120] for r in fflnode_lines]
        assert sum(len(r.getMessage()) for r in fflnode_lines) < 2000


# -------------------------------------------------------------------- pubsub garbage
async def test_random_bytes_on_meshsub_end_that_stream_not_the_node():
    async with AsyncExitStack() as stack:
        traffic = Traffic()
        victim, _ = await start_host(stack, traffic)
        attacker, _ = await start_host(stack, Traffic())
        await connect(attacker, victim)
        for payload_kind in ("random", "protobuf-prefix"):
            stream = await attacker.new_stream(victim.get_id(), ["/meshsub/1.1.0"])
            junk = os.urandom(1 << 20)
            if payload_kind == "protobuf-prefix":  # a plausible length, then garbage
                junk = bytes([0x80 | 0x7F, 0x7F]) + junk[:0x3FFF]
            with suppress(streams.STREAM_ERRORS):
                await stream.write(junk)
        await until(lambda: traffic.rejected.get("pubsub", 0) >= 1)

        # the victim still answers: a fresh connection, a stream, a reply
        async def pong(stream) -> None:
            await stream.write(b"alive")
            await stream.close()

        victim.set_stream_handler("/test/alive", pong)
        other, _ = await start_host(stack, Traffic())
        await connect(other, victim)
        with trio.fail_after(WAIT_S):
            s = await other.new_stream(victim.get_id(), ["/test/alive"])
            assert await streams.read_exactly(s, 5) == b"alive"


# ------------------------------------------------------------ validation before forwarding
async def test_a_hostile_announcement_stops_at_the_first_honest_node():
    """attacker -- relay -- far: the relay validates before forwarding, so `far` never
    sees the hostile message, while a valid one takes the same path."""
    async with AsyncExitStack() as stack:
        traffics = [Traffic(), Traffic()]
        hosts = [await start_host(stack, t) for t in traffics]
        memberships = [Membership(h, p, RUN, t) for (h, p), t in zip(hosts, traffics, strict=True)]
        for m, (_, p) in zip(memberships, hosts, strict=True):
            p.set_topic_validator(m.topic, m.validate, False)
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        for m in memberships:
            await nursery.start(m.run)
        (relay, _), (far, _) = hosts
        await connect(far, relay)
        attacker, apubsub = await start_host(stack, Traffic())
        await connect(attacker, relay)
        topic = announce_topic(RUN)
        await apubsub.subscribe(topic)
        await until(lambda: len(memberships[0].alive()) == 1 and len(memberships[1].alive()) == 1)
        await trio.sleep(2.0)  # let GossipSub graft the attacker into the relay's mesh
        deep = b"\x91" * 1000 + b"\x01"
        bad = [
            deep,
            b"\xc1",
            wire.encode("hb", run="other", round=0, phase="join", addrs=[], seq=1, admit={}),
        ]
        for data in bad:
            await apubsub.publish(topic, data)
        await until(lambda: sum(traffics[0].rejected.values()) >= len(bad))
        valid = wire.encode("hb", run=RUN, round=0, phase="join", addrs=[], seq=1, admit={})
        await apubsub.publish(topic, valid)
        await until(lambda: attacker.get_id() in memberships[1].peers)  # forwarded by relay
        assert sum(traffics[1].rejected.values()) == 0  # far never saw the hostile ones
        assert traffics[0].rejected.get("malformed", 0) == 2


# ------------------------------------------------------------------ admission, for real
async def test_peers_with_another_descriptor_or_no_secret_are_never_admitted(caplog):
    caplog.set_level(logging.WARNING, logger="fflnode")
    secret = os.urandom(32)
    ours = admission.Admission(GROUPS, secret)
    cases = {
        "member": ours,
        "layout": admission.Admission({**GROUPS, "layout": [["w", [4, 4]]]}, secret),
        "no-secret": admission.Admission(GROUPS),
        "wrong-secret": admission.Admission(GROUPS, os.urandom(32)),
    }
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        nodes = {}
        for name, adm in {"us": ours, **cases}.items():
            traffic = Traffic(peer_log=PeerLog(logging.getLogger(f"fflnode.test.{name}")))
            host, pubsub = await start_host(stack, traffic)
            m = Membership(host, pubsub, RUN, traffic, adm)
            pubsub.set_topic_validator(m.topic, m.validate, False)
            await nursery.start(m.run)
            nodes[name] = (host, m)
        us, m_us = nodes["us"]
        for name in cases:
            await connect(nodes[name][0], us)

        def refusals(name: str) -> dict[str, str]:
            return {str(k): r.field for k, r in nodes[name][1].refused.items()}

        def peer(name: str) -> str:
            return str(nodes[name][0].get_id())

        # Refusal is mutual where both hold a secret or a layout: a peer that refuses our
        # heartbeats scores us out of its mesh (each rejection costs us 10 points) and may
        # stop publishing to us before its first heartbeat reached us. We keep publishing
        # to it, so its refusal of us is certain; ours of it is certain only for the peer
        # without a secret, which accepts our heartbeats.
        await until(
            lambda: (
                refusals("us").get(peer("no-secret")) == "secret"
                and refusals("layout").get(peer("us")) == "layout"
                and refusals("wrong-secret").get(peer("us")) == "secret"
                and len(m_us.alive()) == 1
            )
        )
        await trio.sleep(3 * 1.0)  # three more heartbeats each: still nobody else admitted
        assert m_us.alive() == [nodes["member"][0].get_id()]
        expected = {peer("layout"): "layout", peer("no-secret"): "secret"}
        expected[peer("wrong-secret")] = "secret"
        assert refusals("us").items() <= expected.items()  # all we heard, for its reason
        lines = [r.getMessage() for r in caplog.records if r.name == "fflnode.test.us"]
        assert any("does not prove it holds the run secret" in line for line in lines)
        # one line per refused peer, however many heartbeats
        assert len(lines) == len(refusals("us"))
        for name, why in (("layout", "model parameter layout"), ("wrong-secret", "is wrong")):
            theirs = [r.getMessage() for r in caplog.records if r.name == f"fflnode.test.{name}"]
            assert any(peer("us")[-6:] in line and why in line for line in theirs), theirs
