"""Every config key does something a test can see, and a bad value is refused at load.

Each effect test below loads a config with non-default values (fflnode.config.load, from
a file, so relative paths resolve as they do for the daemon), builds what the daemon
builds from it (fflnode.compose.compose, fflnode.node.Node, or Node.run in this process
on loopback), and observes the effect on behaviour: what is trained, sent, dialled,
refused, logged or written. The refusal tests give every key of the schema a value of
the wrong type, every range check an out-of-range value, and every cross-key rule a
breaking pair, and expect one ConfigError line naming the file and the key. KEY_TESTS
at the end maps every key of the schema and of configs/node.toml to the tests that
observe it; test_every_config_key_has_a_test_that_observes_it fails when a key is added
without one, or removed while still listed.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import math
import os
import time
import tomllib
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import multiaddr
import numpy as np
import pytest
import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr

from fflnode import checkpoint, config, daemon, metrics, robust
from fflnode.admission import Admission
from fflnode.codecs import ChunkContext
from fflnode.compose import Composition, compose
from fflnode.errors import ConfigError, FflError, MergeError, leaf_error
from fflnode.exchange import SHARD_PROTOCOL, Averaging, Gossip, Liveness
from fflnode.exchange_sharded import ShardedAveraging
from fflnode.merge.protocol import (
    MERGE_HASH_PROTOCOL,
    MERGE_PROTOCOL,
    MergeExcluded,
    MergeTimeout,
)
from fflnode.node import MERGED_FILE, NODE_FILE, PREMERGE_FILE, RESULT_FILE, Node
from fflnode.p2p import bulk, identity, streams
from fflnode.p2p.barrier import StartRefused
from fflnode.p2p.fastpath import FastPathError
from fflnode.p2p.host import build_host, running_host
from fflnode.prism.reader import SafetensorsFile
from fflnode.prism.store import TensorStore
from fflnode.prism.writer import save_tensors
from fflnode.tensors import canonical_mean
from fflnode.train.model import GRUClassifier
from fflnode.train.tasks.synthetic import SyntheticTask
from fflnode_harness.adversary import SIGNFLIP_SCALE
from tests.conftest import REPO
from tests.p2p_harness import peers

# A digits GRU of width 8 (354 parameters): rounds and evaluations take milliseconds.
BASE: dict[str, dict[str, Any]] = {
    "node": {"data_dir": "data", "listen": ["/ip4/127.0.0.1/tcp/0"]},
    "run": {"run_id": "effects", "seed": 1, "nodes": 2, "rounds": 3},
    "train": {"task": "digits"},
    "task": {"model": "gru", "width": 8},
}
RUN_TIMEOUT_S = 60.0  # a one-node run here takes ~3 s (the merge settles for 2 s)
MEET_TIMEOUT_S = 30.0  # two in-process nodes hear each other within a few heartbeats
REFUSAL_TIMEOUT_S = 5.0  # the gate refuses in milliseconds (tests/test_access.py)
PSK = "5e" * 32
RUN_SECRET = "c3" * 32


# ------------------------------------------------------------------------ helpers
def toml_of(doc: dict[str, dict[str, Any]]) -> str:
    """The TOML text of a two-level document of plain values (JSON spells them alike)."""
    lines = []
    for section, table in doc.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


# A lossy codec is accepted only with a non-adaptive outer step (fflnode.config).
DILOCO_OUTER = {"outer_optimizer": "sgd", "outer_lr": 0.7, "outer_momentum": 0.9}


def load(where: Path, **sections: dict[str, Any]) -> config.Config:
    """BASE with `sections` laid over it, written to where/node.toml and loaded."""
    doc = {name: dict(table) for name, table in BASE.items()}
    for name, table in sections.items():
        doc.setdefault(name, {}).update(table)
    if doc["train"]["task"] != BASE["train"]["task"]:  # another task: only its own options
        doc["task"] = dict(sections.get("task", {}))
    where.mkdir(parents=True, exist_ok=True)
    path = where / "node.toml"
    path.write_text(toml_of(doc))
    return config.load(path)


def key_file(path: Path, text: str) -> str:
    path.write_text(text + "\n")
    os.chmod(path, 0o600)
    return str(path)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """compose() sets torch's thread count from the config: put back the suite's one."""
    yield
    torch.set_num_threads(1)


async def exchange_for(comp: Composition, host: Any, members: list[ID], liveness: Any) -> Any:
    """The round exchange the daemon builds for this composition (fflnode.node)."""
    return await Node(comp)._exchange(host, members, liveness)


def merge_session_for(node: Node, peer: Any, members: list[ID]) -> Any:
    """The merge session the daemon builds for this node (fflnode.node)."""
    return node._merge_session(peer.host, peer.membership, members, node.comp.layout, 0)


def free_tcp_port() -> int:
    """A port nothing listens on now (the kernel's pick for a socket closed at once)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def random_ids(n: int) -> list[ID]:
    return [ID.from_pubkey(create_new_key_pair().public_key) for _ in range(n)]


async def run_until_listening(node: Node, nursery: trio.Nursery, outcome: dict) -> None:
    """Start node.run in `nursery`; return once it listens (or raise why it stopped)."""
    stopped = trio.Event()

    async def run() -> None:
        try:
            outcome["report"] = await node.run()
        except Exception as e:  # the node's own error, unwrapped from its nursery
            outcome["error"] = leaf_error(e)
        finally:
            stopped.set()

    nursery.start_soon(run)
    with trio.fail_after(RUN_TIMEOUT_S):
        async with trio.open_nursery() as waiting:

            async def until(event: trio.Event) -> None:
                await event.wait()
                waiting.cancel_scope.cancel()

            waiting.start_soon(until, node.listening)
            waiting.start_soon(until, stopped)
    if not node.listening.is_set():
        raise AssertionError(f"the node stopped before listening: {outcome.get('error')!r}")


# ------------------------------------------------------------ [node] logging
@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    libp2p = {
        name: lg.level
        for name, lg in logging.Logger.manager.loggerDict.items()
        if name.startswith("libp2p") and isinstance(lg, logging.Logger)
    }
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in libp2p.items():
        logging.getLogger(name).setLevel(lvl)


def test_log_format_json_writes_one_json_object_per_line_at_the_log_level(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_logging: None
):
    cfg = load(tmp_path, node={"log_format": "json", "log_level": "warning"})
    daemon.setup_logging(cfg.node.log_level, cfg.node.log_format)
    log = logging.getLogger("fflnode.effects")
    log.info("below the level")
    log.warning("peer %s refused", "12D3KooWx")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines  # info is below "warning"
    doc = json.loads(lines[0])
    assert doc["level"] == "warning" and doc["msg"] == "peer 12D3KooWx refused"
    assert doc["logger"] == "fflnode.effects" and doc["pid"] == os.getpid()
    # py-libp2p's records pass at the node's level, never below WARNING
    assert logging.getLogger("libp2p").level == logging.WARNING


def test_log_level_debug_shows_debug_lines_and_libp2p_routine_in_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_logging: None
):
    cfg = load(tmp_path, node={"log_level": "debug"})  # log_format: text (default)
    daemon.setup_logging(cfg.node.log_level, cfg.node.log_format)
    logging.getLogger("fflnode.effects").debug("a debug line")
    logging.getLogger("libp2p.effects").info("a routine libp2p line")
    err = capsys.readouterr().err
    assert " DEBUG fflnode.effects: a debug line" in err
    assert " INFO libp2p.effects: a routine libp2p line" in err
    with pytest.raises(json.JSONDecodeError):
        json.loads(err.splitlines()[0])


# ------------------------------------------------------------ [train] [task] [run]
def test_train_threads_sets_torchs_intra_op_threads(tmp_path: Path, one_thread: None):
    compose(load(tmp_path, train={"threads": 2}))
    assert torch.get_num_threads() == 2


def test_train_task_and_task_options_choose_what_is_built(tmp_path: Path):
    comp = compose(load(tmp_path / "gru", task={"model": "gru", "width": 8, "batch_size": 7}))
    assert comp.task.spec == "digits" and comp.task.options["batch_size"] == 7
    assert isinstance(comp.trainer.model, GRUClassifier)
    assert comp.trainer.model.rnn.hidden_size == 8 and comp.trainer.numel == 354
    x, y = next(comp.trainer.batches)
    assert x.shape[0] == 7 and y.shape == (7,)  # task.batch_size
    ssd = compose(load(tmp_path / "ssd", task={"model": "ssd", "width": 16}))
    assert type(ssd.trainer.model).__name__ == "SSDClassifier"
    assert ssd.trainer.numel != comp.trainer.numel
    merge_only = compose(load(tmp_path / "syn", run={"rounds": 0}, train={"task": "synthetic"},
                              task={"mb": 1}))  # fmt: skip
    assert merge_only.trainer is None and isinstance(merge_only.task.task, SyntheticTask)
    assert merge_only.layout.numel == sum(
        math.prod(s) for s in SyntheticTask(mb=1).layout(1).values()
    )


def test_task_alpha_sets_how_skewed_each_partitions_labels_are(tmp_path: Path):
    def top_label_share(alpha: float) -> float:
        comp = compose(load(tmp_path / str(alpha), run={"nodes": 4}, task={"alpha": alpha}))
        labels = comp.task.task.split(0, 4, comp.cfg.run.seed).y.numpy()
        counts = np.bincount(labels, minlength=10)
        return counts.max() / counts.sum()

    assert top_label_share(0.05) > 0.5  # nearly one class per node
    assert top_label_share(100.0) < 0.2  # nearly uniform


def test_partition_index_nodes_and_seed_choose_the_data_and_the_initial_weights(
    tmp_path: Path,
):
    def first_batch(comp: Composition) -> torch.Tensor:
        return next(comp.trainer.batches)[0]

    a = compose(load(tmp_path / "a", run={"nodes": 4}, train={"partition_index": 0}))
    b = compose(load(tmp_path / "b", run={"nodes": 4}, train={"partition_index": 3}))
    c = compose(load(tmp_path / "c", run={"nodes": 2}, train={"partition_index": 0}))
    d = compose(load(tmp_path / "d", run={"nodes": 4, "seed": 2}))
    task = a.task.task
    expected = next(iter(task.train_data(3, 4, 1)))[0]
    assert torch.equal(first_batch(b), expected)  # partition 3 of 4, seed 1
    assert not torch.equal(first_batch(a), first_batch(b))
    assert len(task.split(0, 4, 1)) != len(task.split(0, 2, 1))  # run.nodes splits the data
    assert torch.equal(first_batch(c), next(iter(task.train_data(0, 2, 1)))[0])
    assert torch.equal(a.trainer.flat(), b.trainer.flat())  # one seed, one initial model
    assert not torch.equal(a.trainer.flat(), d.trainer.flat())  # run.seed
    assert not torch.equal(next(iter(task.train_data(0, 4, 2)))[0], first_batch(a))


def test_inner_optimizer_lr_and_local_steps_shape_the_inner_steps(tmp_path: Path):
    one = compose(load(tmp_path / "a", train={"inner_lr": 0.1}))
    two = compose(load(tmp_path / "b", train={"inner_lr": 0.2, "local_steps": 3}))
    theta = one.trainer.flat()
    assert torch.equal(theta, two.trainer.flat())
    one.trainer.inner_steps(1)
    two.trainer.inner_steps(1)  # the same first batch, twice the step
    torch.testing.assert_close(theta - two.trainer.flat(), 2 * (theta - one.trainer.flat()))
    two.trainer.inner_steps()
    assert two.trainer.steps_taken == 1 + 3  # train.local_steps per round
    adam = compose(load(tmp_path / "c", train={"inner_optimizer": "adam", "inner_lr": 0.01}))
    assert isinstance(adam.trainer.inner, torch.optim.Adam)
    assert isinstance(one.trainer.inner, torch.optim.SGD)
    assert adam.trainer.inner.param_groups[0]["lr"] == 0.01


def test_outer_optimizer_lr_momentum_and_schedule_shape_the_outer_step(tmp_path: Path):
    sgd = compose(load(tmp_path / "a", train={
        "outer_optimizer": "sgd", "outer_lr": 0.5, "outer_momentum": 0.9,
        "lr_schedule": "constant",
    }))  # fmt: skip
    theta = sgd.trainer.flat()
    g = torch.linspace(-1, 1, theta.numel())
    sgd.trainer.outer_step(theta, g)  # Nesterov: theta - lr (g + mu m), m = g
    torch.testing.assert_close(sgd.trainer.flat(), theta - 0.5 * (g + 0.9 * g))
    sgd.trainer.outer_step(theta, g)  # m = mu g + g
    torch.testing.assert_close(sgd.trainer.flat(), theta - 0.5 * (g + 0.9 * (0.9 * g + g)))
    adam = compose(load(tmp_path / "b"))  # outer Adam: every coordinate moves by lr at t=1
    adam.trainer.outer_step(theta, g)
    step = (theta - adam.trainer.flat()).abs()
    torch.testing.assert_close(step[g != 0], torch.full_like(step[g != 0], 3e-3))
    rounds = 8

    def lr_at(schedule: str, t: int) -> float:
        comp = compose(load(tmp_path / schedule, run={"rounds": rounds},
                            train={"lr_schedule": schedule, "outer_lr": 1.0}))  # fmt: skip
        comp.trainer.outer.t = t
        return comp.trainer.outer.lr

    assert lr_at("cosine", rounds // 2) == pytest.approx(0.5)
    assert lr_at("wsd", rounds // 2) == 1.0 and lr_at("wsd", rounds - 1) == 0.5
    assert lr_at("constant", rounds - 1) == 1.0


def test_adversary_mode_corrupts_what_the_node_publishes(tmp_path: Path):
    honest = compose(load(tmp_path / "a"))
    assert honest.adversary is None
    comp = compose(load(tmp_path / "b", adversary={"mode": "signflip"}))
    x = torch.linspace(-1, 1, 11)
    assert torch.equal(comp.adversary.corrupt(x), x * -SIGNFLIP_SCALE)
    node = Node(comp)
    path = tmp_path / PREMERGE_FILE
    node._write_premerge(path, comp.layout)
    with SafetensorsFile(path) as f:
        written = f.tensors()
    for name, t in comp.trainer.state_tensors().items():
        assert torch.equal(written[name], t * -SIGNFLIP_SCALE), name
    nan = compose(load(tmp_path / "c", adversary={"mode": "nan"})).adversary
    assert torch.isnan(nan.corrupt(x)).all()
    noise = compose(load(tmp_path / "d", adversary={"mode": "random"})).adversary.corrupt(x)
    assert torch.isfinite(noise).all()
    assert noise.pow(2).mean().sqrt() > 5 * x.pow(2).mean().sqrt()  # RANDOM_SCALE x the RMS


# ------------------------------------------------------------ [exchange] codecs
def test_codec_bits_scale_and_ratio_set_what_goes_on_the_wire(tmp_path: Path):
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    ctx = ChunkContext(1, 0, 0, x.numel())

    def codec(**exchange: Any):
        name = "-".join(f"{k}{v}" for k, v in exchange.items())
        train = DILOCO_OUTER if exchange.get("codec", "none") != "none" else {}
        return compose(load(tmp_path / name, exchange=exchange, train=train)).codec

    assert compose(load(tmp_path / "none")).codec.name == "none"
    one = codec(codec="holo", bits=1).encode(x, ctx)
    two = codec(codec="holo", bits=2).encode(x, ctx)
    assert one.parts["codes"].nbytes * 2 == two.parts["codes"].nbytes
    assert two.wire_bytes > 1.8 * one.wire_bytes

    def error(holo_scale: str) -> float:
        c = codec(codec="holo", holo_scale=holo_scale)
        return float((c.decode(c.encode(x, ctx), ctx) - x).norm() / x.norm())

    assert error("mse") < error("unbiased")  # least squares: the lower error
    topk = codec(codec="topk", ratio=0.1)
    kept = int((topk.decode(topk.encode(x, ctx), ctx) != 0).sum())
    assert kept == round(0.1 * x.numel())


# ------------------------------------------------------------ [exchange] the round
async def test_topology_degree_gamma_scheme_robust_and_chunks_shape_the_exchange(
    tmp_path: Path,
):
    host = build_host(create_new_key_pair())  # never started: the exchange only holds it
    me = host.get_id()

    async def built(nodes: int, **sections: dict[str, Any]) -> Any:
        name = f"x{len(list(tmp_path.iterdir()))}"
        comp = compose(load(tmp_path / name, run={"nodes": nodes, **sections.pop("run", {})},
                            **sections))  # fmt: skip
        return await exchange_for(comp, host, [me, *random_ids(nodes - 1)], Liveness())

    complete = await built(4)
    assert type(complete) is ShardedAveraging and len(complete.peers) == 3
    ring = await built(6, run={"topology": "ring"}, exchange={"gamma": 0.5})
    assert type(ring) is Gossip and len(ring.peers) == 2
    assert len((await built(6, run={"topology": "random-regular", "degree": 3})).peers) == 3
    assert len((await built(6, run={"topology": "random-regular"})).peers) == 2
    # gamma: theta_mix = theta_local + gamma w (x_j - x_i), w = 1 / (neighbours + 1)
    numel = ring.public.numel()
    theta = torch.zeros(numel)
    peer = ring.peers[0]
    ring.copies[peer] = ring.public + 3.0
    mixed, _ = ring._mix(theta, [peer])
    torch.testing.assert_close(mixed, torch.full((numel,), 0.5 * 3.0 / 3))
    # scheme: the exact codec all-gathered instead of reduce-scattered
    assert type(await built(4, exchange={"scheme": "all-gather"})) is Averaging
    # a lossy codec reduce-scatters by default: each owner re-encodes its shard's mean
    # with feedback of its own, beside each member's feedback of what it lost
    holo_rs = await built(4, exchange={"codec": "holo"}, train=DILOCO_OUTER)
    assert type(holo_rs) is ShardedAveraging and holo_rs.codec.name == "holo"
    assert holo_rs.residual is not None and holo_rs.owner_residual is not None
    assert complete.residual is None and complete.owner_residual is None
    # ... or all-gathers its compressed Deltas
    holo = await built(4, exchange={"codec": "holo", "scheme": "all-gather"}, train=DILOCO_OUTER)
    assert type(holo) is Averaging and holo.codec.name == "holo" and holo.residual is not None
    # holo_scale "auto": unbiased Deltas where owners average them, the least-squares
    # scale where each is applied as it is, and always for an owner's re-encoding
    assert holo_rs.codec.scale == "unbiased" and holo.codec.scale == "mse"
    assert holo_rs.mean_codec.scale == "mse"
    # robust and trim: the round's mix of five Deltas, one of them huge
    mixing = await built(5, exchange={"robust": "trimmed-mean", "trim": 2})
    deltas = {bytes([i]): torch.full((8,), float(i)) for i in range(4)}
    deltas[b"\xff"] = torch.full((8,), 1e6)
    torch.testing.assert_close(mixing._mix(deltas), torch.full((8,), 2.0))  # the median
    assert torch.equal(mixing._mix(deltas), robust.trimmed_mean(deltas, 2))
    assert not torch.equal((await built(5))._mix(deltas), mixing._mix(deltas))
    # chunk_elems: the Delta travels in pieces of at most that many elements
    chunked = await built(4, exchange={"scheme": "all-gather", "chunk_elems": 2048})
    published = chunked.encode(0, torch.ones(5000), 7)
    assert [e.parts["values"].size for e in published.chunks] == [2048, 2048, 904]
    assert complete.pieces(0, 5000) == [(0, 5000)]  # the default is 1 Mi elements


def test_exchange_scheme_is_part_of_the_run_digest(tmp_path: Path):
    """Reduce-scatter and all-gather rounds cannot meet: a peer on the other scheme is
    refused at the barrier, naming the exchange group; "auto" that resolves the same is
    admitted."""
    stranger = random_ids(1)[0].to_bytes()

    def refusal(ours: dict[str, Any], theirs: dict[str, Any]) -> Any:
        a = Admission(compose(load(tmp_path / "a", exchange=ours)).run_descriptor(), None)
        b = Admission(compose(load(tmp_path / "b", exchange=theirs)).run_descriptor(), None)
        claim = b.heartbeat_fields(stranger)
        return a.check(stranger, claim["admit"], claim.get("proof"))

    assert refusal({"scheme": "auto"}, {"scheme": "all-gather"}).field == "exchange"
    assert refusal({"scheme": "auto"}, {"scheme": "reduce-scatter"}) is None


async def test_round_timeout_s_bounds_how_long_a_round_waits_for_a_peer(tmp_path: Path):
    async with peers(2) as ps:
        members = [p.id for p in ps]
        exchanges = []
        for i, p in enumerate(ps):
            comp = compose(load(tmp_path / str(i), train={"partition_index": i},
                                exchange={"round_timeout_s": 1.0}))  # fmt: skip
            ex = await exchange_for(comp, p.host, members, p.membership)
            p.host.set_stream_handler(SHARD_PROTOCOL, ex.handle)
            exchanges.append(ex)
        waiting, silent = exchanges  # the silent peer never finishes round 0
        numel = 354
        waiting.publish(0, waiting.encode(0, torch.ones(numel), 7))
        t0 = time.monotonic()
        with trio.fail_after(RUN_TIMEOUT_S):
            mean, report = await waiting.gather(0)
        elapsed = time.monotonic() - t0
    assert report.missing == [str(ps[1].id)] and torch.equal(mean, torch.ones(numel))
    # a whole round_timeout_s waited, and nowhere near the default 60 s
    assert 1.0 <= elapsed < 20.0, elapsed


# ------------------------------------------------------------ [merge] [prism]
@dataclasses.dataclass
class ThreeNodeMerge:
    """A real merge of in-process nodes (merge_three: the third sign-flips its premerge)."""

    ids: list[ID]
    outcomes: dict[ID, Any]  # the session's MergeOutcome, or the exception it raised
    premerges: dict[ID, dict[str, torch.Tensor]]
    merged: dict[ID, dict[str, torch.Tensor]]
    stores: list[dict[str, Any]]  # each premerge store's stats, before it closed
    quorums: list[int]  # each session's agreement quorum

    def mean_of(self, ids: list[ID]) -> dict[str, torch.Tensor]:
        return canonical_mean([(p.to_bytes(), self.premerges[p]) for p in ids])


def merge_nodes(
    tmp_path: Path, ps: list[Any], merge: dict[str, Any], prism: dict[str, Any], flipper: int = -1
) -> tuple[list[Node], list[Any], dict[ID, dict[str, torch.Tensor]]]:
    """One node per peer (node `flipper` sign-flips), each with its premerge file written
    and the merge session the daemon builds serving on its host; and the premerges."""
    ids = [p.id for p in ps]
    task = {"model": "gru", "width": 0}  # 13,514 elements: several pieces per shard
    nodes, sessions, premerges = [], [], {}
    for i, p in enumerate(ps):
        comp = compose(
            load(
                tmp_path / str(i),
                run={"nodes": len(ps)},
                merge=merge,
                prism=prism,
                task=task,
                train={"partition_index": i},
                adversary={"mode": "signflip" if i == flipper else "none"},
            )
        )
        node = Node(comp)
        node.trainer.inner_steps()  # partitions differ: so do the weights
        node.data_dir.mkdir(parents=True)
        node._write_premerge(node.data_dir / PREMERGE_FILE, comp.layout)
        with SafetensorsFile(node.data_dir / PREMERGE_FILE) as f:
            premerges[p.id] = f.tensors()
        session = merge_session_for(node, p, ids)
        p.host.set_stream_handler(MERGE_PROTOCOL, session.handle)
        p.host.set_stream_handler(MERGE_HASH_PROTOCOL, session.handle_hash)
        nodes.append(node)
        sessions.append(session)
    return nodes, sessions, premerges


async def run_merge(node: Node, session: Any) -> Any:
    """The session's MergeOutcome, or the MergeError it raised (unwrapped)."""
    d = node.data_dir
    try:
        return await session.run(d / PREMERGE_FILE, d / MERGED_FILE)
    except Exception as e:  # the session's error, inside its nursery's group
        if not isinstance(leaf_error(e), MergeError):
            raise
        return leaf_error(e)


def merged_files(ids: list[ID], nodes: list[Node]) -> dict[ID, dict[str, torch.Tensor]]:
    """Each node's merged tensors, for the nodes that wrote a merged file."""
    merged = {}
    for pid, node in zip(ids, nodes, strict=True):
        if (node.data_dir / MERGED_FILE).is_file():
            with SafetensorsFile(node.data_dir / MERGED_FILE) as f:
                merged[pid] = f.tensors()
    return merged


async def merge_three(tmp_path: Path, merge: dict[str, Any], prism: dict[str, Any]) -> Any:
    async with peers(3) as ps:
        ids = [p.id for p in ps]
        nodes, sessions, premerges = merge_nodes(tmp_path, ps, merge, prism, flipper=2)
        outcomes: dict[ID, Any] = {}

        async def one(pid: ID, node: Node, session: Any) -> None:
            outcomes[pid] = await run_merge(node, session)

        with trio.fail_after(RUN_TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                for pid, node, session in zip(ids, nodes, sessions, strict=True):
                    nursery.start_soon(one, pid, node, session)
        stores = [s.premerge.stats() for s in sessions]
        quorums = [s.agreement.quorum for s in sessions]
        for s in sessions:
            s.close()
    return ThreeNodeMerge(ids, outcomes, premerges, merged_files(ids, nodes), stores, quorums)


async def test_merge_and_prism_settings_shape_a_three_node_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Shards, pieces, window, quorum, exclude_outliers off and the Prism backend and
    pool of a real merge of three nodes, one of them a sign-flipping outlier."""
    monkeypatch.delenv("FFLNODE_PRISM_BACKEND", raising=False)
    requests: list[bulk.Request] = []
    real_submit = bulk.Link.submit

    def recording_submit(self: bulk.Link, req: bulk.Request) -> None:
        requests.append(req)
        real_submit(self, req)

    monkeypatch.setattr(bulk.Link, "submit", recording_submit)
    merge = {"shards": 5, "window": 3, "piece_elems": 1024, "quorum": 3,
             "exclude_outliers": False}  # fmt: skip
    m = await merge_three(tmp_path, merge, {"backend": "threads", "pool_mb": 5})
    expected = m.mean_of(m.ids)
    for pid, outcome in m.outcomes.items():
        assert outcome.shards == 5 and outcome.excluded == {}  # the outlier merged too
        assert len(outcome.members) == 3
        assert all(torch.equal(m.merged[pid][k], expected[k]) for k in expected)
    assert sorted(j for o in m.outcomes.values() for j in o.owned) == list(range(5))
    # merge.window x merge.piece_elems float32 values: the window the merge sizes its
    # pieces and its aggregation memory by (the bound itself: tests/test_merge_p2p.py),
    # and no piece over piece_elems
    for outcome in m.outcomes.values():
        assert outcome.window_bytes == 3 * 1024 * 4
    sizes = [r.hi - r.lo for r in requests if r.what in ("premerge", "merged")]
    assert sizes and max(sizes) <= 1024  # merge.piece_elems
    assert m.quorums == [3, 3, 3]  # merge.quorum (its effect: the next test)
    for stats in m.stores:
        assert stats["backend"] == "threads" and stats["depth"] == 3  # pool_mb 5: 3 + 2 slots
        assert stats["open_streams"], stats
        for stream in stats["open_streams"]:
            assert stream["backend"] == "threads" and stream["slots"] == 5


async def test_merge_exclude_outliers_leaves_a_sign_flipper_out_of_the_merge(
    tmp_path: Path,
):
    """The default, exclude_outliers = true: the same three nodes as above, and the two
    honest ones merge without the flipper, which learns it was excluded."""
    m = await merge_three(tmp_path, {"exclude_outliers": True}, {})
    honest, flipper = m.ids[:2], m.ids[2]
    assert isinstance(m.outcomes[flipper], MergeExcluded), m.outcomes[flipper]
    expected = m.mean_of(honest)
    for pid in honest:
        outcome = m.outcomes[pid]
        assert list(outcome.excluded) == [str(flipper)], outcome
        assert sorted(outcome.members) == sorted(str(p) for p in honest)
        assert all(torch.equal(m.merged[pid][k], expected[k]) for k in expected)


async def test_merge_quorum_lets_a_node_merge_alone_and_timeout_s_ends_a_stuck_merge(
    tmp_path: Path,
):
    async with peers(1) as ps:
        (p,) = ps
        members = [p.id, *random_ids(1)]  # the other member never shows up

        async def merge(name: str, **merge: Any) -> Any:
            comp = compose(load(tmp_path / name, merge=merge))
            node = Node(comp)
            node.data_dir.mkdir(parents=True)
            node._write_premerge(node.data_dir / PREMERGE_FILE, comp.layout)
            session = merge_session_for(node, p, members)
            try:
                return await session.run(node.data_dir / PREMERGE_FILE, node.data_dir / MERGED_FILE)
            finally:
                session.close()

        with trio.fail_after(RUN_TIMEOUT_S):
            outcome = await merge("alone", quorum=1)
        assert outcome.members == [str(p.id)]
        t0 = time.monotonic()
        with trio.fail_after(RUN_TIMEOUT_S), pytest.raises(MergeTimeout) as info:
            await merge("majority", timeout_s=1.0)  # quorum 0: a majority of 2 is 2
        elapsed = time.monotonic() - t0
    assert "did not agree on members within merge.timeout_s = 1 s" in str(info.value)
    assert elapsed < 20.0  # nowhere near the default 300 s


async def test_merge_window_is_the_number_of_requests_in_flight(tmp_path: Path):
    """bulk.pull keeps exactly `window` requests ahead: the server reads that many gets,
    answers one, and the next thing on the stream is the ack, then one more get."""
    cfg = load(tmp_path, merge={"window": 3})
    window = cfg.merge.window
    protocol, run = "/fflnode/effects/1.0.0", "effects"
    seen: list[str] = []

    async def serve(stream: Any) -> None:
        for _ in range(window + 2):
            msg = await streams.recv_message(stream, expect={"get", "ack"}, run=run)
            seen.append(msg.kind)
            if len(seen) == window:
                await streams.send_bulk(
                    stream, run=run, round=0, what="premerge", index=0, codec="none",
                    parts=[("values", np.zeros(msg["hi"] - msg["lo"], np.float32))],
                )  # fmt: skip
        await streams.reset_quietly(stream)

    requests = [bulk.Request(0, "premerge", 0, k * 8, k * 8 + 8) for k in range(8)]
    listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    server, client = build_host(create_new_key_pair()), build_host(create_new_key_pair())
    async with running_host(server, listen), running_host(client, listen):
        server.set_stream_handler(protocol, serve)
        await client.connect(info_from_p2p_addr(server.get_addrs()[0]))
        with trio.fail_after(RUN_TIMEOUT_S), pytest.raises(FflError):
            await bulk.pull(client, server.get_id(), protocol, run, requests,
                            lambda *a: None, bulk.Traffic(), window=window)  # fmt: skip
    assert seen == ["get"] * window + ["ack", "get"]


def test_prism_backend_and_pool_mb_are_what_the_store_reads_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("FFLNODE_PRISM_BACKEND", raising=False)
    comp = compose(load(tmp_path, prism={"backend": "buffered", "pool_mb": 7}))
    assert comp.store_options == {"backend": "buffered", "depth": 5}
    path = tmp_path / "w.safetensors"
    save_tensors(path, {"w": torch.arange(3 << 18, dtype=torch.float32)})

    async def read() -> dict[str, Any]:
        store = TensorStore.open(path, **comp.store_options)
        out = np.empty(3 << 18, np.float32)
        await store.read_into(0, 3 << 18, out)
        assert out[-1] == (3 << 18) - 1
        (stats,) = store.stats()["open_streams"]
        store.close()
        return stats

    stats = trio.run(read)
    assert stats["backend"] == "buffered" and stats["depth"] == 5 and stats["slots"] == 7
    assert stats["reads"]["page_cache"] > 0 and stats["reads"]["direct"] == 0


# ------------------------------------------------------------ whole nodes, in process
async def test_a_one_node_run_follows_rounds_eval_checkpoints_announce_and_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
):
    saved: list[int] = []
    real_save = checkpoint.save

    def recording_save(data_dir: Path, ckpt: checkpoint.Checkpoint) -> Path:
        saved.append(ckpt.round)
        return real_save(data_dir, ckpt)

    monkeypatch.setattr(checkpoint, "save", recording_save)
    announce = "/ip4/203.0.113.5/tcp/4001"
    cfg = load(
        tmp_path,
        node={"announce": [announce], "data_dir": "state"},
        run={"run_id": "effects-solo", "nodes": 1, "rounds": 5},
        train={"local_steps": 2, "eval_every": 2, "checkpoint_every": 3},
        merge={"shards": 3},
    )
    node = Node(compose(cfg))
    with trio.fail_after(RUN_TIMEOUT_S):
        report = await node.run()
    data = tmp_path / "state"  # node.data_dir, relative to the config file
    for name in ("identity.key", NODE_FILE, RESULT_FILE, checkpoint.CHECKPOINT_FILE,
                 PREMERGE_FILE, MERGED_FILE):  # fmt: skip
        assert (data / name).is_file(), name
    me = report.peer_id
    assert json.loads((data / NODE_FILE).read_text())["addrs"] == [f"{announce}/p2p/{me}"]
    assert node.membership.topic == "/fflnode/effects-solo/announce/1"  # run.run_id
    with SafetensorsFile(data / MERGED_FILE) as f:
        assert f.header.metadata["fflnode.run"] == "effects-solo"
    assert [r.round for r in report.rounds] == [0, 1, 2, 3, 4]  # run.rounds
    assert [r.round for r in report.rounds if r.metrics] == [1, 3, 4]  # eval_every, last
    assert node.trainer.steps_taken == 5 * 2  # local_steps per round
    # checkpoint_every 3: after round 2 and the last; never after 0, 1 or 3. A state the
    # writer had not reached before the next one superseded it may be skipped.
    assert set(saved) <= {2, 4} and saved[-1] == 4
    ckpt = checkpoint.load(data, "effects-solo", node.trainer.numel)
    assert ckpt is not None and ckpt.round == 4
    assert report.merge["shards"] == 3  # merge.shards


async def test_a_lone_node_listens_where_told_and_gives_up_after_start_timeout_s(
    tmp_path: Path, one_thread: None
):
    listen = "/ip4/127.0.0.3/tcp/0"  # loopback, but not the suite's usual 127.0.0.1
    cfg = load(tmp_path, node={"listen": [listen]}, run={"nodes": 3, "start_timeout_s": 1.0})
    node = Node(compose(cfg))
    t0 = time.monotonic()
    with trio.fail_after(RUN_TIMEOUT_S), pytest.raises(Exception) as info:
        await node.run()
    elapsed = time.monotonic() - t0
    error = leaf_error(info.value)
    assert isinstance(error, StartRefused), error
    assert "saw 0 of the 2 peers run 'effects' expects within 1 s" in str(error)
    assert elapsed < 20.0  # nowhere near the default 120 s
    assert node.addrs and all(a.startswith("/ip4/127.0.0.3/tcp/") for a in node.addrs)
    assert json.loads((node.data_dir / NODE_FILE).read_text())["addrs"] == node.addrs


async def test_two_nodes_meet_through_bootstrap_behind_their_access_and_reach_settings(
    tmp_path: Path, one_thread: None
):
    """Node A: psk, run secret, an allowlist naming B, blacklist_after 2, public-only
    dialling, a metrics endpoint, relaxed pubsub defences, its fast path on a fixed
    port. Node B: the same keys, A's address to bootstrap from, no fast path. B gets
    in; outsiders do not; offences ban."""
    psk = key_file(tmp_path / "swarm.key", PSK)
    secret = key_file(tmp_path / "run.secret", RUN_SECRET)
    b_id = ID.from_pubkey(identity.load_or_create(tmp_path / "b" / "data").public_key)
    run = {"nodes": 3, "start_timeout_s": 600}  # a third member never comes: they wait
    access = {"psk_file": psk, "run_secret_file": secret}
    fast_port = free_tcp_port()
    a = Node(compose(load(
        tmp_path / "a", run=run,
        node={"metrics": "127.0.0.1:0", "dial_scopes": ["public"], "fast_path_port": fast_port},
        access={**access, "allow": [str(b_id)], "blacklist_after": 2},
        pubsub={"mesh_diversity_ips": 2, "ip_colocation_threshold": 7},
    )))  # fmt: skip
    outcome: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        await run_until_listening(a, nursery, outcome)
        assert a.addrs and all(x.startswith("/ip4/127.0.0.1/tcp/") for x in a.addrs)
        b = Node(compose(load(tmp_path / "b", run=run, access=access,
                              node={"bootstrap": a.addrs[:1], "fast_path": False})))  # fmt: skip
        await run_until_listening(b, nursery, outcome)
        ok = await a.membership.wait_until(
            lambda: b.peer_id in a.membership.alive(), MEET_TIMEOUT_S
        )
        assert ok, f"B never reached A through node.bootstrap: {outcome}"
        assert b.peer_id == b_id

        # node.metrics: Prometheus text at the configured address
        node_json = json.loads((a.data_dir / NODE_FILE).read_text())
        assert node_json["metrics"] == f"127.0.0.1:{a.metrics_port}"
        scraped = metrics.parse(await metrics.fetch("127.0.0.1", a.metrics_port))
        assert scraped["fflnode_peers_alive"][0][1] == 1.0
        assert scraped["fflnode_rounds_planned"][0][1] == 3.0

        # node.fast_path_port: A's TLS listener is where the key says, and node.json
        # tells; node.fast_path false: B serves no fast path, so A gets no channel to it
        assert node_json["fast_path"] == f"127.0.0.1:{fast_port}" and a.fast.port == fast_port
        with trio.fail_after(REFUSAL_TIMEOUT_S):
            await (await trio.open_tcp_stream("127.0.0.1", fast_port)).aclose()
        b_json = json.loads((b.data_dir / NODE_FILE).read_text())
        assert b.fast is None and b_json["fast_path"] == ""
        with trio.fail_after(REFUSAL_TIMEOUT_S), pytest.raises(FastPathError) as no_offer:
            await a.fast.open(b.peer_id, fallback=False)
        assert no_offer.value.reason == "no-offer", no_offer.value

        # pubsub: the router's eclipse protection and the scorer's colocation threshold
        a_router, b_router = a.membership.pubsub.router, b.membership.pubsub.router
        assert a_router.min_mesh_diversity_ips == 2 and b_router.min_mesh_diversity_ips == 3
        colocated = random_ids(5)
        for router in (a_router, b_router):
            for p in colocated:
                router.scorer.add_peer_ip(p, "192.0.2.77")
        assert a_router.scorer.ip_colocation_penalty(colocated[0]) == 0.0  # 5 <= 7
        assert b_router.scorer.ip_colocation_penalty(colocated[0]) > 0.0  # 5 > 3
        for router in (a_router, b_router):
            for p in colocated:
                router.scorer.remove_peer(p)

        # node.dial_scopes: a private address a peer tells A of never enters its book
        stranger = random_ids(1)[0]
        offered = [multiaddr.Multiaddr(x) for x in ("/ip4/10.1.2.3/tcp/9", "/ip4/8.8.8.8/tcp/9")]
        for n in (a, b):
            n.membership.host.get_peerstore().add_addrs(stranger, offered, 600)
        a_book = {str(x) for x in a.membership.host.get_peerstore().addrs(stranger)}
        b_book = {str(x) for x in b.membership.host.get_peerstore().addrs(stranger)}
        assert a_book == {"/ip4/8.8.8.8/tcp/9"}
        assert b_book == {"/ip4/10.1.2.3/tcp/9", "/ip4/8.8.8.8/tcp/9"}

        # access.psk_file and access.allow: outsiders get no connection
        gate = a.gate
        listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
        target = info_from_p2p_addr(multiaddr.Multiaddr(a.addrs[0]))
        for outsider_psk, cause in ((None, "psk"), (PSK, "allowlist")):
            outsider = build_host(create_new_key_pair(), psk=outsider_psk)
            async with running_host(outsider, listen):
                with trio.fail_after(REFUSAL_TIMEOUT_S), pytest.raises(BaseLibp2pError):
                    await outsider.connect(target)
                with trio.fail_after(REFUSAL_TIMEOUT_S):
                    while not gate.refused.get(cause):
                        await gate.wait_changed()

        # access.run_secret_file: a heartbeat of our run without the secret's proof fails
        admission = a.membership.admission
        assert admission.secret == bytes.fromhex(RUN_SECRET)
        open_run = Admission(a.comp.run_descriptor(), None)
        claim = open_run.heartbeat_fields(stranger.to_bytes())
        refusal = admission.check(stranger.to_bytes(), claim["admit"], claim.get("proof"))
        assert refusal is not None and refusal.field == "secret"

        # access.blacklist_after 2: B's second invalid message bans and disconnects it
        gate.offence(str(b.peer_id), "schema")
        assert gate.allowed(b.peer_id)
        gate.offence(str(b.peer_id), "schema")
        with trio.fail_after(REFUSAL_TIMEOUT_S):
            while not (b.peer_id in gate.banned and gate.banned[b.peer_id].disconnected):
                await gate.wait_changed()
        assert not a.membership.host.get_network().connections.get(b.peer_id)
        nursery.cancel_scope.cancel()
    assert "error" not in outcome, outcome


# ------------------------------------------------------------ refused at load
def bad_type_value(tp: Any) -> Any:
    """A value of the wrong type for annotation `tp` (every schema type is one of these)."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "no-such-choice"
    if origin is list:
        return "not-a-list"
    return {bool: "yes", int: 1.5, float: "1.0", str: 7}[tp]


def schema_keys() -> dict[str, Any]:
    """Every dotted key the loader accepts, with its annotation ([task] is free-form)."""
    out = {}
    sections = typing.get_type_hints(config.Config)
    for f in dataclasses.fields(config.Config):
        if f.name in ("source", "task"):
            continue
        cls = sections[f.name]
        hints = typing.get_type_hints(cls)
        for key in dataclasses.fields(cls):
            out[f"{f.name}.{key.name}"] = hints[key.name]
    return out


def assert_refused(where: Path, key: str, words: list[str], **sections: Any) -> None:
    with pytest.raises(ConfigError) as info:
        load(where, **sections)
    text = str(info.value)
    assert "\n" not in text and str(where / "node.toml") in text, text
    for w in [key, *words]:
        assert w in text, text


@pytest.mark.parametrize("key", sorted(schema_keys()))
def test_every_key_refuses_a_value_of_the_wrong_type_naming_itself(tmp_path: Path, key: str):
    section, name = key.split(".")
    tp = schema_keys()[key]
    assert_refused(tmp_path, key, ["must be"], **{section: {name: bad_type_value(tp)}})


# One out-of-range value per range check in fflnode.config.CHECKS.
OUT_OF_RANGE: dict[str, Any] = {
    "train.memory_budget_mb": -1,
    "train.micro_batch": -1,
    "states.epochs": 0,
    "states.bits": 9,
    "states.batch": 0,
    "states.quorum": -1,
    "states.timeout_s": 0,
    "node.metrics": "localhost",
    "node.fast_path_port": 65536,
    "run.nodes": 0,
    "run.rounds": -1,
    "run.degree": 0,
    "run.start_timeout_s": 0,
    "run.run_id": "a/b",
    "train.partition_index": -1,
    "train.task": "",
    "train.local_steps": 0,
    "train.inner_lr": 0,
    "train.outer_lr": -0.1,
    "train.outer_momentum": 1.0,
    "train.threads": 0,
    "train.eval_every": 0,
    "train.checkpoint_every": 0,
    "exchange.bits": 9,
    "exchange.ratio": 0,
    "exchange.gamma": 1.5,
    "exchange.chunk_elems": 1023,
    "exchange.trim": 0,
    "exchange.round_timeout_s": 0,
    "merge.shards": 65537,
    "merge.window": 17,
    "merge.timeout_s": -1,
    "merge.quorum": -1,
    "merge.piece_elems": 1 << 25,
    "prism.pool_mb": 0,
    "pubsub.mesh_diversity_ips": 65,
    "pubsub.ip_colocation_threshold": 0,
    "access.blacklist_after": 0,
}


def test_every_range_check_has_an_out_of_range_value():
    assert set(OUT_OF_RANGE) == {key for key, _, _ in config.CHECKS}


@pytest.mark.parametrize("key", sorted(OUT_OF_RANGE))
def test_every_range_check_refuses_an_out_of_range_value_naming_the_key(tmp_path: Path, key: str):
    section, name = key.split(".")
    (what,) = [what for k, _, what in config.CHECKS if k == key]
    assert_refused(tmp_path, key, [f"must be {what}"], **{section: {name: OUT_OF_RANGE[key]}})


PEER = "12D3KooWRBy97UB99e3J6hiPesre1MZeuNQvfan4gBziswrRJsNK"


@pytest.mark.parametrize(
    "key, words, sections",
    [
        ("train.partition_index", ["below run.nodes 2"], {"train": {"partition_index": 2}}),
        ("node.listen", ["at least one"], {"node": {"listen": []}}),
        ("node.listen[0]", ["multiaddr"], {"node": {"listen": ["/ip4/1.2.3.4/tcpx/1"]}}),
        ("node.bootstrap[0]", ["/p2p/"], {"node": {"bootstrap": ["/ip4/192.0.2.1/tcp/1"]}}),
        ("node.announce[0]", ["unspecified"], {"node": {"announce": ["/ip4/0.0.0.0/tcp/1"]}}),
        ("node.dial_scopes[0]", ["one of"], {"node": {"dial_scopes": ["loopback"]}}),
        ("access.allow[1]", ["peer ID"], {"access": {"allow": [PEER, "12D3KooWnope"]}}),
        ("exchange.codec 'sketch'", ["holo"], {"exchange": {"codec": "sketch"}}),
        ("exchange.scheme 'reduce-scatter'", ["all-gather"],
         {"exchange": {"robust": "trimmed-mean", "scheme": "reduce-scatter"}}),
        ("exchange.robust 'mad-mean'", ["run.topology 'complete'"],
         {"exchange": {"robust": "mad-mean"}, "run": {"topology": "ring"}}),
        ("access.psk_file", ["cannot read"], {"access": {"psk_file": "absent.key"}}),
        ("access.run_secret_file", ["cannot read"], {"access": {"run_secret_file": "absent"}}),
        ("node.oops", ["unknown key"], {"node": {"oops": 1}}),
        ("task.inner", ["nested tables"], {"task": {"inner": {"x": 1}}}),
    ],
)  # fmt: skip
def test_values_that_cannot_work_together_are_refused_at_load_naming_the_key(
    tmp_path: Path, key: str, words: list[str], sections: dict[str, Any]
):
    if "task" in sections:  # toml_of writes flat tables only
        path = tmp_path / "node.toml"
        path.write_text(toml_of({k: v for k, v in BASE.items() if k != "task"})
                        + "[task]\n[task.inner]\nx = 1\n")  # fmt: skip
        with pytest.raises(ConfigError, match="task.inner: nested tables"):
            config.load(path)
        return
    assert_refused(tmp_path, key, words, **sections)


@pytest.mark.parametrize(
    "text, words",
    [
        ("ab" * 31, ["must hold 64 hex characters", "found 62"]),
        ("zz" * 32, ["hex characters only"]),
    ],
)
def test_a_bad_key_file_is_refused_at_load_without_echoing_it(
    tmp_path: Path, text: str, words: list[str]
):
    for key in ("psk_file", "run_secret_file"):
        path = key_file(tmp_path / f"{key}.key", text)
        with pytest.raises(ConfigError) as info:
            load(tmp_path, access={key: path})
        assert f"access.{key}" in str(info.value) and text not in str(info.value)
        if key == "psk_file":
            for w in words:
                assert w in str(info.value), str(info.value)
    os.chmod(path, 0o644)
    assert_refused(tmp_path, "access.run_secret_file", ["accessible by others", "chmod 600"],
                   access={"run_secret_file": path})  # fmt: skip


def test_task_options_are_checked_by_the_task_when_it_is_built(tmp_path: Path):
    with pytest.raises(ConfigError, match="task 'digits'"):
        compose(load(tmp_path / "a", task={"model": "no-such-model"}))
    with pytest.raises(ConfigError, match="task 'digits'"):
        compose(load(tmp_path / "b", task={"no_such_option": 1}))


# ------------------------------------------------------------ [states]
def test_states_federate_epochs_codec_bits_batch_quorum_timeout_s_plan_the_state_phase(
    tmp_path: Path,
):
    from fflnode.ssm.state_codec import HoloStateCodec, RawCodec, make_state_codec

    mqar = {"train": {"task": "mqar"}, "task": {"contexts": 16}}
    settings = {"epochs": 2, "codec": "none", "bits": 4, "batch": 5, "quorum": 2,
                "timeout_s": 33.0}  # fmt: skip
    plan = compose(load(tmp_path / "a", **mqar, states=settings)).states
    assert plan is not None
    assert (plan.epochs, plan.codec, plan.bits, plan.batch, plan.quorum, plan.timeout_s) == (
        2, "none", 4, 5, 2, 33.0,
    )  # fmt: skip
    assert isinstance(make_state_codec(plan.codec, plan.bits, plan.seed), RawCodec)
    holo = compose(load(tmp_path / "b", **mqar, states={"bits": 2})).states
    codec = make_state_codec(holo.codec, holo.bits, holo.seed)
    assert isinstance(codec, HoloStateCodec) and codec.bits == 2
    # federate: "auto" plans a phase for a task with states, none for one without; "off"
    # never; "on" refuses a task without the capability at load
    assert compose(load(tmp_path / "c", **mqar, states={"federate": "off"})).states is None
    assert compose(load(tmp_path / "d")).states is None  # digits: no state capability
    with pytest.raises(ConfigError, match="states.federate 'on'"):
        compose(load(tmp_path / "e", states={"federate": "on"}))


# ------------------------------------------------------------ [train] out of core
def test_memory_budget_mb_and_micro_batch_choose_and_shape_the_trainer(tmp_path: Path):
    from fflnode.train.outofcore import OutOfCoreTrainer
    from fflnode.train.trainer import LocalTrainer

    def trainer(budget: int, micro_batch: int = 0) -> Any:
        where = tmp_path / f"b{budget}-{micro_batch}"
        return compose(load(
            where, run={"nodes": 1},
            train={"task": "text", "inner_optimizer": "adam", "memory_budget_mb": budget,
                   "micro_batch": micro_batch, "outer_optimizer": "sgd"},
            task={"seq_len": 32, "batch_size": 4, "d_model": 256, "n_layers": 8, "d_state": 8},
            # the round's chunk passes must fit the budget too (fflnode.train.outofcore),
            # and only an all-gather of compressed Deltas streams (compose)
            exchange={"chunk_elems": 1 << 18, "codec": "holo", "bits": 1,
                      "scheme": "all-gather"},
        )).trainer  # fmt: skip

    assert isinstance(trainer(0), LocalTrainer)  # no budget: in memory
    assert isinstance(trainer(4096), LocalTrainer)  # the model fits
    streamed = trainer(64, micro_batch=2)  # 87 MB in memory over 64 MiB: out of core
    try:
        assert isinstance(streamed, OutOfCoreTrainer)
        assert streamed.memory_budget == 64 << 20
        assert streamed._micro_batches(4) == [(0, 2), (2, 4)]
    finally:
        streamed.close()


# ------------------------------------------------------------ every key has its test
# Every key of the schema and of configs/node.toml -> the tests that change it and
# observe its effect. Refusals at load are covered for every key by the tests above.
STATES_TEST = "test_states_federate_epochs_codec_bits_batch_quorum_timeout_s_plan_the_state_phase"
BUDGET_TEST = "test_memory_budget_mb_and_micro_batch_choose_and_shape_the_trainer"
KEY_TESTS: dict[str, tuple[str, ...]] = {
    **{
        f"states.{k}": (STATES_TEST,)
        for k in ("federate", "epochs", "codec", "bits", "batch", "quorum", "timeout_s")
    },
    "train.memory_budget_mb": (BUDGET_TEST,),
    "train.micro_batch": (BUDGET_TEST,),
    "node.data_dir": ("test_a_one_node_run_follows_rounds_eval_checkpoints_announce_and_data_dir",),
    "node.listen": ("test_a_lone_node_listens_where_told_and_gives_up_after_start_timeout_s",),
    "node.bootstrap": (
        "test_two_nodes_meet_through_bootstrap_behind_their_access_and_reach_settings",
    ),
    "node.log_level": (
        "test_log_level_debug_shows_debug_lines_and_libp2p_routine_in_text",
        "test_log_format_json_writes_one_json_object_per_line_at_the_log_level",
    ),
    "node.log_format": ("test_log_format_json_writes_one_json_object_per_line_at_the_log_level",),
    "node.announce": ("test_a_one_node_run_follows_rounds_eval_checkpoints_announce_and_data_dir",),
    "node.dial_scopes": (
        "test_two_nodes_meet_through_bootstrap_behind_their_access_and_reach_settings",
    ),
    "node.metrics": (
        "test_two_nodes_meet_through_bootstrap_behind_their_access_and_reach_settings",
    ),
    "node.fast_path": (
        "test_two_nodes_meet_through_bootstrap_behind_their_access_and_reach_settings",
    ),
    "node.fast_path_port": (
        "test_two_nodes_meet_through_bootstrap_behind_their_access_and_reach_settings",
    ),
    "run.run_id": ("test_a_one_node_run_follows_rounds_eval_checkpoints_announce_and_data_dir",),
    "run.seed": ("test_partition_index_nodes_and_seed_choose_the_data_and_the_initial_weights",),
    "run.nodes": ("test_partition_index_nodes_and_seed_choose_the_data_and_the_initial_weights",),
    "run.rounds": (
        "test_a_one_node_run_follows_rounds_eval_checkpoints_announce_and_data_dir",
        "test_outer_optimizer_lr_momentum_and_schedule_shape_the_outer_step",
    ),
    "run.topology": ("test_topology_degree_gamma_scheme_robust_and_chunks_shape_the_exchange",),
    "run.degree": ("test_topology_degree_gamma_scheme_robust_and_chunks_shape_the_exchange",),
    "run.start_timeout_s": (
        "test_a_lone_node_listens_where_told_and_gives_up_after_start_timeout_s",
    ),
    "train.task": ("test_train_task_and_task_options_choose_what_is_built",),
    "train.partition_index": (
        "test_partition_index_nodes_and_seed_choose_the_data_and_the_initial_weights",
    ),
    "train.local_steps": (
        "test_inner_optimizer_lr_and_local_steps_shape_the_inner_steps",
        "test_a_one_node_run_follows_rounds_eval_checkpoints_announce_and_data_dir",
    ),
    "train.inner_optimizer": ("test_inner_optimizer_lr_and_local_steps_shape_the_inner_steps",),
    "train.inner_lr": ("test_inner_optimizer_lr_and_local_steps_shape_the_inner_steps",),
    "train.outer_optimizer": (
        "test_outer_optimizer_lr_momentum_and_schedule_shape_the_outer_step",
    ),
    "train.outer_lr": ("test_outer_optimizer_lr_momentum_and_schedule_shape_the_outer_step",),
    "train.outer_momentum": ("test_outer_optimizer_lr_momentum_and_schedule_shape_the_outer_step",),
    "train.lr_schedule": ("test_outer_optimizer_lr_momentum_and_schedule_shape_the_outer_step",),
    "train.threads": ("test_train_threads_sets_torchs_intra_op_threads",),
    "train.eval_every": (
        "test_a_one_node_run_follows_rounds_eval_checkpoints_announce_and_data_dir",
    ),
    "train.checkpoint_every": (
        "test_a_one_node_run_follows_rounds_eval_checkpoints_announce_and_data_dir",
    ),
    "task.model": ("test_train_task_and_task_options_choose_what_is_built",),
    "task.alpha": ("test_task_alpha_sets_how_skewed_each_partitions_labels_are",),
    "task.batch_size": ("test_train_task_and_task_options_choose_what_is_built",),
    "exchange.codec": (
        "test_codec_bits_scale_and_ratio_set_what_goes_on_the_wire",
        "test_topology_degree_gamma_scheme_robust_and_chunks_shape_the_exchange",
    ),
    "exchange.bits": ("test_codec_bits_scale_and_ratio_set_what_goes_on_the_wire",),
    "exchange.holo_scale": ("test_codec_bits_scale_and_ratio_set_what_goes_on_the_wire",),
    "exchange.ratio": ("test_codec_bits_scale_and_ratio_set_what_goes_on_the_wire",),
    "exchange.gamma": ("test_topology_degree_gamma_scheme_robust_and_chunks_shape_the_exchange",),
    "exchange.robust": ("test_topology_degree_gamma_scheme_robust_and_chunks_shape_the_exchange",),
    "exchange.trim": ("test_topology_degree_gamma_scheme_robust_and_chunks_shape_the_exchange",),
    "exchange.scheme": (
        "test_topology_degree_gamma_scheme_robust_and_chunks_shape_the_exchange",
        "test_exchange_scheme_is_part_of_the_run_digest",
    ),
    "exchange.chunk_elems": (
        "test_topology_degree_gamma_scheme_robust_and_chunks_shape_the_exchange",
    ),
    "exchange.round_timeout_s": ("test_round_timeout_s_bounds_how_long_a_round_waits_for_a_peer",),
    "merge.shards": (
        "test_merge_and_prism_settings_shape_a_three_node_merge",
        "test_a_one_node_run_follows_rounds_eval_checkpoints_announce_and_data_dir",
    ),
    "merge.window": (
        "test_merge_and_prism_settings_shape_a_three_node_merge",
        "test_merge_window_is_the_number_of_requests_in_flight",
    ),
    "merge.timeout_s": (
        "test_merge_quorum_lets_a_node_merge_alone_and_timeout_s_ends_a_stuck_merge",
    ),
    "merge.quorum": ("test_merge_quorum_lets_a_node_merge_alone_and_timeout_s_ends_a_stuck_merge",),
    "merge.piece_elems": ("test_merge_and_prism_settings_shape_a_three_node_merge",),
    "merge.exclude_outliers": (
        "test_merge_and_prism_settings_shape_a_three_node_merge",
        "test_merge_exclude_outliers_leaves_a_sign_flipper_out_of_the_merge",
    ),
    "pubsub.mesh_diversity_ips": (
        "test_two_nodes_meet_through_bootstrap_behind_their_access_and_reach_settings",
    ),
    "pubsub.ip_colocation_threshold": (
        "test_two_nodes_meet_through_bootstrap_behind_their_access_and_reach_settings",
    ),
    "prism.backend": (
        "test_prism_backend_and_pool_mb_are_what_the_store_reads_with",
        "test_merge_and_prism_settings_shape_a_three_node_merge",
    ),
    "prism.pool_mb": (
        "test_prism_backend_and_pool_mb_are_what_the_store_reads_with",
        "test_merge_and_prism_settings_shape_a_three_node_merge",
    ),
    "access.psk_file": (
        "test_two_nodes_meet_through_bootstrap_behind_their_access_and_reach_settings",
    ),
    "access.allow": (
        "test_two_nodes_meet_through_bootstrap_behind_their_access_and_reach_settings",
    ),
    "access.blacklist_after": (
        "test_two_nodes_meet_through_bootstrap_behind_their_access_and_reach_settings",
    ),
    "access.run_secret_file": (
        "test_two_nodes_meet_through_bootstrap_behind_their_access_and_reach_settings",
    ),
    "adversary.mode": ("test_adversary_mode_corrupts_what_the_node_publishes",),
}


def shipped_config_keys() -> set[str]:
    """Dotted keys of configs/node.toml, the commented-out examples included."""
    path = REPO / "configs" / "node.toml"
    keys = {f"{s}.{k}" for s, table in tomllib.loads(path.read_text()).items() for k in table}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif line.startswith("#") and section:
            body = line.lstrip("#").strip()
            name, eq, value = body.partition("=")
            if eq and value.strip() and name.strip().isidentifier():
                keys.add(f"{section}.{name.strip()}")
    return keys


def test_every_config_key_has_a_test_that_observes_it():
    """Adding a key to the schema or to configs/node.toml needs a KEY_TESTS entry naming
    tests that exist here and set that key; a removed key must leave the table too."""
    keys = set(schema_keys()) | shipped_config_keys()
    assert not keys - set(KEY_TESTS), f"keys with no effect test: {sorted(keys - set(KEY_TESTS))}"
    assert not set(KEY_TESTS) - keys, f"stale entries: {sorted(set(KEY_TESTS) - keys)}"
    source = Path(__file__).read_text()
    tree = ast.parse(source)
    tests = {
        node.name: ast.get_source_segment(source, node) or ""
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }
    for key, names in KEY_TESTS.items():
        assert names, key
        leaf = key.split(".")[1]
        for name in names:
            assert name in tests, f"{key}: no test named {name}"
            assert leaf in tests[name], f"{key}: {name} never mentions {leaf!r}"
