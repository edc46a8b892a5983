"""F-SSD over the network: state bodies validated against the local model, all-or-nothing
pulls (one context or a batch per request), and real libp2p peers that merge each other's
MQAR states into the centralized one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trio

from fflnode import wire
from fflnode.errors import MergeError, WireError
from fflnode.p2p import bulk
from fflnode.ssm import federation, mqar
from fflnode.ssm.federation import (
    STATE_CODEC,
    STATE_PROTOCOL,
    STATE_WHAT,
    Announcements,
    Lookup,
    PeerPull,
    StateBook,
)
from fflnode.ssm.federation_net import StateFederation, StatePullError
from fflnode.ssm.model import SSDConfig, SSDModel
from fflnode.ssm.state_codec import HoloStateCodec, RawCodec
from fflnode.ssm.states import LayerState, merge_model, relative_error, unstack_layers
from tests.conftest import REPO
from tests.p2p_harness import peers

SPEC = ((2, 3, 4), (2, 3, 4))  # two layers of (heads, head_dim, d_state)
RUN = "test-run"
PEER = "12D3KooWPeerUnderTestxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
ME, OTHER = b"\x00me", b"\x01other"
P2P_TIMEOUT_S = 60.0
CONTEXTS = 32  # MQAR sequences in the network test: 32 x 24 foreign queries per peer


def layer_states(seed: int, spec=SPEC) -> tuple[LayerState, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(
        LayerState(torch.randn(*s, generator=g), -torch.rand(s[0], generator=g)) for s in spec
    )


def held_parts(seed: int = 0) -> list[tuple[str, np.ndarray]]:
    book = StateBook(SPEC, OTHER)
    book.put_own(5, 2, layer_states(seed))
    return [(name, arr.copy()) for name, arr in book.own(5).parts]


def body(
    parts, *, run=RUN, round=2, index=5, codec=STATE_CODEC, meta=None
) -> tuple[wire.BulkHeader, dict[str, np.ndarray]]:
    """A body as a receiver sees it: encoded, framed, decoded and digest-checked."""
    framed, views = wire.bulk_header(
        run=run, round=round, what=STATE_WHAT, index=index, codec=codec, parts=parts, meta=meta
    )
    msg = wire.decode(framed[wire.LENGTH_PREFIX.size :], PEER, expect={"bulk"})
    header = wire.as_bulk_header(msg)
    return header, wire.check_body(header, memoryview(b"".join(bytes(v) for v in views)), PEER)


def start_pull(book: StateBook, contexts=(4, 5)) -> PeerPull:
    return PeerPull(book, OTHER, PEER, run=RUN, round=2, contexts=list(contexts))


# ----------------------------------------------------------------------------- sans-IO
def test_a_valid_body_enters_the_book_only_at_commit():
    book = StateBook(SPEC, ME)
    pull = start_pull(book)
    pull.add(4, *body(held_parts(1), index=4))
    pull.add(5, *body(held_parts(2), index=5))
    assert book.received(5, 2) == {}  # nothing before every context validated
    assert pull.commit() == 2
    got = book.received(5, 2)[OTHER]
    for g, want in zip(got, layer_states(2), strict=True):
        assert torch.equal(g.h, want.h) and torch.equal(g.log_decay, want.log_decay)


def bad_bodies():
    h, log_decay = (arr for _, arr in held_parts())
    nan_h = h.copy()
    nan_h[0, 1, 2, 3] = np.nan
    big_h = h.copy()
    big_h[1, 0, 0, 0] = 1e31
    rising = log_decay.copy()
    rising[0, 1] = 0.5  # a_t > 1: the state would grow without bound
    return {
        "shape": ([("h", h[..., :3].copy()), ("log_decay", log_decay)], {}),
        "layers": ([("h", h[:1].copy()), ("log_decay", log_decay[:1].copy())], {}),
        "dtype": ([("h", h.astype(np.float16)), ("log_decay", log_decay)], {}),
        "nonfinite": ([("h", nan_h), ("log_decay", log_decay)], {}),
        "magnitude": ([("h", big_h), ("log_decay", log_decay)], {}),
        "log_decay>0": ([("h", h), ("log_decay", rising)], {}),
        "extra part": ([("h", h), ("log_decay", log_decay), ("x", log_decay)], {}),
        "missing part": ([("h", h)], {}),
        "renamed part": ([("h", h), ("decay", log_decay)], {}),
        "meta": ([("h", h), ("log_decay", log_decay)], {"meta": {"scale": 1.0}}),
        "run": ([("h", h), ("log_decay", log_decay)], {"run": "other-run"}),
        "round": ([("h", h), ("log_decay", log_decay)], {"round": 3}),
        "context": ([("h", h), ("log_decay", log_decay)], {"index": 6}),
        "codec": ([("h", h), ("log_decay", log_decay)], {"codec": "ssd-state/2"}),
    }


REASONS = {
    "shape": "shape",
    "layers": "shape",
    "dtype": "dtype",
    "nonfinite": "nonfinite",
    "magnitude": "state",
    "log_decay>0": "state",
    "extra part": "schema",
    "missing part": "schema",
    "renamed part": "schema",
    "meta": "schema",
    "run": "run",
    "round": "round",
    "context": "index",
    "codec": "codec",
}


@pytest.mark.parametrize("case", sorted(REASONS))
def test_a_bad_body_is_a_typed_error_and_leaves_the_book_unchanged(case):
    book = StateBook(SPEC, ME)
    book.put_own(5, 2, layer_states(9))
    before = book.own(5)
    pull = start_pull(book)
    pull.add(4, *body(held_parts(1), index=4))  # a good answer first: it must not stick
    parts, overrides = bad_bodies()[case]
    with pytest.raises(WireError) as info:
        pull.add(5, *body(parts, **overrides))
    assert info.value.reason == REASONS[case], info.value
    assert PEER[:8] in str(info.value)  # the message names the peer
    with pytest.raises(WireError, match="incomplete"):
        pull.commit()
    assert book.received(4, 2) == {} and book.received(5, 2) == {}
    assert book.own(5) is before


def test_positive_log_decay_is_refused_even_when_the_wire_check_passes():
    h, log_decay = (arr for _, arr in held_parts())
    log_decay = log_decay.copy()
    log_decay[1, 0] = 1e-3
    header, arrays = body([("h", h), ("log_decay", log_decay)])
    with pytest.raises(WireError) as info:
        federation.states_from_body(header, arrays, SPEC, PEER, run=RUN, context=5, round=2)
    assert info.value.reason == "state" and "log_decay" in str(info.value)


def test_an_unrequested_or_repeated_context_is_refused():
    book = StateBook(SPEC, ME)
    pull = start_pull(book)
    with pytest.raises(WireError) as info:
        pull.add(7, *body(held_parts(), index=7))
    assert info.value.reason == "index"
    pull.add(5, *body(held_parts()))
    with pytest.raises(WireError, match="twice"):
        pull.add(5, *body(held_parts()))
    with pytest.raises(MergeError):
        PeerPull(book, ME, PEER, run=RUN, round=2, contexts=[5])  # our own states


def test_requests_are_checked_before_anything_is_looked_up():
    def get(**kw):
        fields = dict(run=RUN, round=2, what=STATE_WHAT, index=5, lo=0, hi=0, codec=STATE_CODEC)
        return wire.decode(wire.encode("get", **{**fields, **kw}), PEER)

    assert federation.check_request(get()) == (5, 2)
    for bad in ({"what": "delta"}, {"codec": "none"}, {"hi": 3}):
        with pytest.raises(ValueError):
            federation.check_request(get(**bad))


def test_versions_and_eviction(monkeypatch):
    monkeypatch.setattr(federation, "MAX_OWN_CONTEXTS", 3)
    book = StateBook(SPEC, ME)
    assert book.lookup(0, 0)[0] is Lookup.PENDING  # never read here
    book.put_own(0, 1, layer_states(0))
    assert book.lookup(0, 1)[0] is Lookup.READY
    assert book.lookup(0, 0)[0] is Lookup.GONE  # superseded
    assert book.lookup(0, 2)[0] is Lookup.PENDING  # not read yet
    for c in (1, 2, 3):
        book.put_own(c, 0, layer_states(c))
    assert book.lookup(0, 1)[0] is Lookup.GONE  # evicted, oldest first
    assert all(book.lookup(c, 0)[0] is Lookup.READY for c in (1, 2, 3))


def test_merges_need_every_named_peer_and_are_canonical():
    book = StateBook(SPEC, b"\x05")
    book.put_own(0, 0, layer_states(0))
    for peer, seed in ((b"\x09", 1), (b"\x01", 2)):
        pull = PeerPull(book, peer, "p", run=RUN, round=0, contexts=[0])
        pull.add(0, *body(held_parts(seed), round=0, index=0))
        pull.commit()
    expected = merge_model(
        {b"\x05": layer_states(0), b"\x09": layer_states(1), b"\x01": layer_states(2)}
    )
    got = federation.merged_batch([book.members(0, 0, [b"\x09", b"\x01"])])
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g.h[0], e.h) and torch.equal(g.log_decay[0], e.log_decay)
    assert federation.states_digest([s for s in expected]) == federation.states_digest(
        [LayerState(g.h[0], g.log_decay[0]) for g in got]
    )
    with pytest.raises(MergeError, match="no state from 1 peer"):
        book.members(0, 0, [b"\x09", b"\x07"])


def test_announcements_cover_ranges_at_one_round():
    fields = federation.ready_fields(range(10, 20), 3)
    msg = wire.decode(wire.encode("state.ready", run=RUN, **fields), PEER)
    contexts, round = federation.parse_ready(msg)
    assert (contexts, round) == (range(10, 20), 3)
    seen = Announcements()
    seen.add(OTHER, contexts, round)
    assert seen.covers(OTHER, [10, 19], 3)
    assert not seen.covers(OTHER, [20], 3) and not seen.covers(OTHER, [10], 2)
    assert not seen.covers(ME, [10], 3)
    with pytest.raises(ValueError):
        federation.ready_fields(range(0, wire.MAX_ANNOUNCED_CONTEXTS + 1), 0)


def batch_body(book: StateBook, contexts: range, *, round=2, index=None, codec=None, count=None):
    """A batched answer as a receiver sees it, built from `book`'s held contexts."""
    helds = [book.own(c) for c in contexts]
    parts = federation.batch_parts(helds)
    if count is not None:  # a body for another count than asked
        parts = federation.batch_parts(helds[:count])
    tag = codec or federation.batch_tag(book.codec)
    first = contexts.start if index is None else index
    framed, views = wire.bulk_header(
        run=RUN, round=round, what=STATE_WHAT, index=first, codec=tag, parts=parts
    )
    msg = wire.decode(framed[wire.LENGTH_PREFIX.size :], PEER, expect={"bulk"})
    header = wire.as_bulk_header(msg)
    return header, wire.check_body(header, memoryview(b"".join(bytes(v) for v in views)), PEER)


@pytest.mark.parametrize("codec", [RawCodec(), HoloStateCodec(8, seed=3)], ids=["none", "holo"])
def test_a_batched_body_enters_the_book_only_at_commit_as_its_sender_holds_it(codec):
    server = StateBook(SPEC, OTHER, codec)
    for c in range(4, 10):
        server.put_own(c, 2, layer_states(c))
    book = StateBook(SPEC, ME, codec)
    pull = PeerPull(book, OTHER, PEER, run=RUN, round=2, contexts=list(range(4, 10)))
    pull.add_batch(range(4, 8), *batch_body(server, range(4, 8)))
    assert pull.missing() == [8, 9] and book.received(4, 2) == {}
    pull.add_batch(range(8, 10), *batch_body(server, range(8, 10)))
    assert pull.commit() == 6
    for c in range(4, 10):  # bit-identical to what the sender composes with
        got, want = book.received(c, 2)[OTHER], server.own(c).states
        assert all(torch.equal(g.h, w.h) for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("case", ["index", "round", "codec", "count", "repeat", "unasked"])
def test_a_bad_batched_answer_is_a_typed_error(case):
    server = StateBook(SPEC, OTHER)
    for c in range(0, 6):
        server.put_own(c, 2, layer_states(c))
    pull = PeerPull(StateBook(SPEC, ME), OTHER, PEER, run=RUN, round=2, contexts=[0, 1, 2, 3])
    want = {"index": "index", "round": "round", "codec": "codec", "count": "shape"}
    if case == "repeat":
        pull.add_batch(range(0, 2), *batch_body(server, range(0, 2)))
        args = (range(1, 3), *batch_body(server, range(1, 3)))
        want[case] = "index"
    elif case == "unasked":
        args = (range(3, 5), *batch_body(server, range(3, 5)))
        want[case] = "index"
    else:
        overrides = {
            "index": {"index": 1},
            "round": {"round": 3},
            "codec": {"codec": "ssd-states/1;holo8"},
            "count": {"count": 1},
        }[case]
        args = (range(0, 2), *batch_body(server, range(0, 2), **overrides))
    with pytest.raises(WireError) as info:
        pull.add_batch(*args)
    assert info.value.reason == want[case], info.value


def test_batches_are_runs_of_consecutive_contexts_cut_to_size():
    assert federation.batches([5, 1, 2, 3, 9, 4, 10], 3) == [
        range(1, 4), range(4, 6), range(9, 11)
    ]  # fmt: skip
    limit = federation.batch_limit(((8, 64, 64),), RawCodec(), 1000)
    assert limit * RawCodec().body_nbytes(((8, 64, 64),), 1) <= federation.MAX_BATCH_BODY_BYTES

    def get(**kw):
        fields = dict(run=RUN, round=2, what=STATE_WHAT, index=5, lo=0, hi=4,
                      codec="ssd-states/1;none")  # fmt: skip
        return wire.decode(wire.encode("get", **{**fields, **kw}), PEER)

    tag = federation.batch_tag(RawCodec())
    assert federation.check_batch_request(get(), tag, 8) == (range(5, 9), 2)
    for bad in ({"hi": 0}, {"hi": 9}, {"lo": 1}, {"codec": "ssd-states/1;holo8"}):
        with pytest.raises(ValueError):
            federation.check_batch_request(get(**bad), tag, 8)


# ----------------------------------------------------------------------------- network
def recall_model() -> SSDModel:
    """A 1-layer SSD model built, not trained, to solve MQAR exactly: a context token
    writes its value (one-hot, x) at its key (one-hot, B) into the state, nothing decays
    (a_t = exp(-dt·e^-20)), a query token reads at its key (C) and the head maps the value
    read back to its logit. A key whose pair is not in the state reads 0: logits all 0, a
    1/64 guess. So recall is 100 % with every pair and chance for pairs never seen."""
    K, V, D, OUT = mqar.KEYS, mqar.VALUES, 256, 192  # OUT: model dims the value is read into
    cfg = SSDConfig(
        vocab_sizes=(K, V + 1),
        d_model=D,
        n_layers=1,
        d_state=K,
        headdim=D,
        expand=1,
        mlp_ratio=0,
        chunk_size=32,
        n_outputs=V,
        readout="sequence",
    )
    model = SSDModel(cfg)
    keys, values = torch.arange(K), torch.arange(V)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        model.embed.tables[0][keys, keys] = 1.0  # key k -> dim k
        model.embed.tables[1][values, K + values] = 1.0  # value v -> dim K + v; QUERY -> 0
        model.blocks[0].norm1.weight.fill_(1.0)
        mixer = model.blocks[0].mixer
        W = mixer.in_proj.weight  # rows: z (D), x (D), B (K), C (K), dt (1)
        W[:D, :K] = 1.0  # z: one positive gate for every token (each has exactly one key)
        W[D + values, K + values] = 1.0  # x: the value, one-hot; a query token writes 0
        W[2 * D + keys, keys] = 1.0  # B: where to write, the key
        W[2 * D + K + keys, keys] = 1.0  # C: where to read, the key
        mixer.A_log.fill_(-20.0)  # no forgetting over a few dozen steps
        mixer.norm.weight.fill_(1.0)
        mixer.out_proj.weight[OUT + values, values] = 1.0
        model.readout.norm.weight.fill_(1.0)
        model.readout.head.weight[values, OUT + values] = 1.0
    return model.eval()


async def test_peers_pull_states_and_continue_from_the_centralized_state():
    model, n = recall_model(), 4
    b = mqar.sample(np.random.Generator(np.random.PCG64(1234)), CONTEXTS)
    owner = mqar.query_owner(b, n)
    with torch.no_grad():
        own = [model.forward_with_states(mqar.segment(b.pairs, n, j))[1] for j in range(n)]

    def recall(states, mask) -> float:
        with torch.no_grad():
            logits, _ = model.forward_with_states(b.queries, states)
        return float(mqar.hits(logits, b.answers)[mask].float().mean())

    merged, feds = {}, []
    with trio.fail_after(P2P_TIMEOUT_S):
        async with peers(n) as ps, trio.open_nursery() as nursery:
            for j, p in enumerate(ps):  # even peers pull 8 contexts per request, odd ones 1
                fed = StateFederation(
                    p.membership,
                    StateBook(model.state_spec(), p.id.to_bytes()),
                    p.traffic,
                    batch=8 if j % 2 == 0 else 1,
                )
                await nursery.start(fed.run)
                for c, states in enumerate(unstack_layers(own[j])):
                    fed.put_own(c, 0, states)
                feds.append(fed)
            contexts = range(CONTEXTS)

            async def node(j: int) -> None:
                others = [p.id for p in ps if p.id != ps[j].id]
                for peer in others:
                    assert await feds[j].pull(peer, contexts, 0) == CONTEXTS
                book, everyone = feds[j].book, [p.id.to_bytes() for p in ps]
                members = [book.members(c, 0, everyone) for c in contexts]
                merged[j] = federation.merged_batch(members)

            async with trio.open_nursery() as pulling:
                for j in range(n):
                    pulling.start_soon(node, j)
            nursery.cancel_scope.cancel()
        order = sorted(range(n), key=lambda j: ps[j].id.to_bytes())
        assert all(p.traffic.rejected == {} for p in ps)
        per_peer = CONTEXTS * federation.body_nbytes(model.state_spec())
        assert all(p.traffic.received[STATE_PROTOCOL] >= (n - 1) * per_peer for p in ps)

    with torch.no_grad():
        context = torch.cat([mqar.segment(b.pairs, n, j) for j in order], dim=1)
        _, central = model.forward_with_states(context)
    digests = {federation.states_digest(m) for m in merged.values()}
    assert len(digests) == 1  # every peer merged bit-identical states
    for states in merged.values():
        assert relative_error(states[0], central[0]) <= 1e-6
    assert recall(central, torch.ones_like(owner, dtype=torch.bool)) == 1.0
    for j in range(n):
        foreign = owner != j
        alone, with_merged = recall(own[j], foreign), recall(merged[j], foreign)
        assert alone < 0.1  # near chance (1/64): these pairs never reached node j
        assert with_merged == recall(central, foreign) == 1.0


async def test_unknown_gone_and_hostile_answers_change_nothing():
    async with peers(2) as (a, b):
        book_a, book_b = StateBook(SPEC, a.id.to_bytes()), StateBook(SPEC, b.id.to_bytes())
        fed_a = StateFederation(a.membership, book_a, a.traffic, wait_s=0.2)
        fed_b = StateFederation(b.membership, book_b, b.traffic, wait_s=0.2)
        with trio.fail_after(P2P_TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(fed_a.run)
                await nursery.start(fed_b.run)
                fed_b.put_own(0, 0, layer_states(0))
                fed_b.put_own(1, 1, layer_states(1))
                with pytest.raises(StatePullError, match="unknown"):
                    await fed_a.pull(b.id, [0, 2], 0)  # context 2 never read by b
                with pytest.raises(StatePullError, match="gone"):
                    await fed_a.pull(b.id, [0, 1], 0)  # b holds context 1 at round 1 only
                assert book_a.received(0, 0) == {}  # context 0 arrived, but not all did

                async def hostile(peer: str, msg: wire.Message) -> bulk.Resolved:
                    h, log_decay = (arr for _, arr in held_parts())
                    return STATE_CODEC, [("h", h[:, :, :2].copy()), ("log_decay", log_decay)], {}

                async def hostile_handler(stream) -> None:
                    await bulk.serve(stream, STATE_PROTOCOL, RUN, hostile, b.traffic)

                b.host.set_stream_handler(STATE_PROTOCOL, hostile_handler)
                with pytest.raises(WireError) as info:
                    await fed_a.pull(b.id, [0], 0)
                assert info.value.reason == "shape" and str(b.id)[:8] in str(info.value)
                assert a.traffic.rejected == {"shape": 1}
                assert book_a.received(0, 0) == {}
                b.host.set_stream_handler(STATE_PROTOCOL, fed_b.handle)  # honest again
                assert await fed_a.pull(b.id, [1], 1) == 1
                assert set(book_a.received(1, 1)) == {b.id.to_bytes()}
                nursery.cancel_scope.cancel()


# ----------------------------------------------------------------------------- the demo
def test_fflnode_states_is_the_testnet_on_the_mqar_task():
    from fflnode.cli import build_parser

    args = build_parser().parse_args(["states", "--nodes", "2", "--out", "x"])
    assert args.command == "states" and args.task == "mqar" and args.nodes == 2
    assert not (REPO / "fflnode_harness" / "states_demo.py").exists()  # one implementation
