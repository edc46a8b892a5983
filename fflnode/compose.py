"""The composition root: one place turns a validated config into the node's objects.

Everything that can be checked without the network is checked here, before the event
loop starts, so a bad setting stops the daemon at once with one line (exit 2): the task
is imported and built (its options, its model's layout and dtypes), the codec and its
parameters, the keys on disk (psk, run secret), the announce addresses, the Prism
settings. fflnode.node then only runs the lifecycle with what this returns.

Must never: import the harness (fflnode_harness: testnet, demos) unless the config asks
for a resilience-testing adversary; touch the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fflnode.codecs import Codec, make_codec
from fflnode.config import Config, read_psk, read_run_secret
from fflnode.errors import ConfigError
from fflnode.states_phase import StatesPlan, plan_states
from fflnode.tensors import FlatLayout
from fflnode.train.outofcore import OutOfCoreTrainer, in_memory_bytes, pin_allocator
from fflnode.train.task import (
    LoadedTask,
    build_model,
    build_skeleton,
    load_task,
    materialize_model,
    task_chain,
)
from fflnode.train.trainer import (
    BatchStream,
    LocalTrainer,
    TrainSettings,
    settings_from,
)

# The out-of-core trainer's block files live here, under the node's data directory.
OUTOFCORE_DIR = "outofcore"


@dataclass
class Composition:
    """What a node is made of, built and checked before it starts."""

    cfg: Config
    task: LoadedTask
    trainer: LocalTrainer | OutOfCoreTrainer | None  # None for a merge-only task
    layout: FlatLayout  # what the final merge averages (the premerge file's tensors)
    codec: Codec
    psk: str | None
    run_secret: bytes | None
    adversary: Any | None  # fflnode_harness.adversary.Adversary, resilience tests only
    store_options: dict[str, object]
    states: StatesPlan | None = None  # the state phase after the merge ([states])

    def run_descriptor(self) -> dict[str, object]:
        """What every participant must have identical (fflnode.admission), by group."""
        cfg = self.cfg
        t, e, m, r = cfg.train, cfg.exchange, cfg.merge, cfg.run
        return {
            "seed": r.seed,
            "size": [r.nodes, r.rounds],
            "topology": [r.topology, r.degree if r.topology == "random-regular" else 0],
            "task": [t.task, cfg.task],
            "layout": [[s.name, list(s.shape)] for s in self.layout.slots],
            "recipe": [
                t.local_steps,
                t.inner_optimizer,
                t.inner_lr,
                t.outer_optimizer,
                t.outer_lr,
                t.outer_momentum,
                t.lr_schedule,
            ],
            "exchange": [
                e.codec,
                e.bits,
                holo_scale(cfg),
                e.ratio,
                e.gamma,
                e.robust,
                e.trim,
                e.chunk_elems,
                reduce_scatters(cfg),  # two nodes on different schemes cannot meet
            ],
            "merge": [m.shards, m.quorum, m.piece_elems, m.exclude_outliers],
            "states": [] if self.states is None else [
                self.states.epochs, self.states.codec, self.states.bits, self.states.quorum
            ],
        }  # fmt: skip


def reduce_scatters(cfg: Config) -> bool:
    """Whether a complete graph's rounds reduce-scatter their Deltas (fflnode.exchange_
    sharded) rather than all-gather them: exchange.scheme with "auto" resolved (the
    plain mean reduce-scatters, with any codec; a robust mix needs every whole Delta)."""
    e = cfg.exchange
    if cfg.run.topology != "complete":
        return False
    return e.scheme == "reduce-scatter" or (e.scheme == "auto" and e.robust == "none")


def holo_scale(cfg: Config) -> str:
    """exchange.holo_scale with "auto" resolved: unbiased where a complete graph's lossy
    Deltas are reduce-scattered (averaged, then re-encoded), mse elsewhere."""
    e = cfg.exchange
    if e.holo_scale != "auto":
        return e.holo_scale
    return "unbiased" if reduce_scatters(cfg) else "mse"


def codec_of(cfg: Config) -> Codec:
    e = cfg.exchange
    params: dict[str, Any] = {}
    if e.codec == "holo":
        params = {"bits": e.bits, "scale": holo_scale(cfg)}
    elif e.codec in ("topk", "sketch"):
        params = {"ratio": e.ratio}
    return make_codec(e.codec, **params)


def compose(cfg: Config) -> Composition:
    """Build and check everything the node needs; ConfigError names what is wrong."""
    torch.set_num_threads(cfg.train.threads)
    loaded = load_task(cfg.train.task, cfg.task, cfg.base_dir)
    trainer: LocalTrainer | OutOfCoreTrainer | None = None
    if loaded.trains:
        settings = settings_from(cfg.train, cfg.run.seed, cfg.run.rounds)
        trainer = make_trainer(cfg, loaded, settings)
        layout = FlatLayout.from_shapes(trainer.state_shapes())  # reads no weights
    else:
        if cfg.run.rounds:
            raise ConfigError(
                f"{cfg.source}: task {cfg.train.task!r} trains nothing (merge only): "
                "set run.rounds = 0"
            )
        layout = FlatLayout.from_shapes(loaded.task.layout(cfg.run.seed))  # type: ignore[union-attr]
    adversary = None
    if cfg.adversary.mode != "none":  # resilience testing only: the harness's code
        from fflnode_harness.adversary import Adversary

        adversary = Adversary(cfg.adversary.mode, cfg.run.seed + cfg.train.partition_index)
    return Composition(
        cfg=cfg,
        task=loaded,
        trainer=trainer,
        layout=layout,
        codec=codec_of(cfg),
        psk=read_psk(cfg),
        run_secret=read_run_secret(cfg),
        adversary=adversary,
        store_options=store_options(cfg),
        states=states_of(cfg, loaded, trainer),
    )


def states_of(
    cfg: Config, loaded: LoadedTask, trainer: LocalTrainer | OutOfCoreTrainer | None
) -> StatesPlan | None:
    """The state phase, or None. Folding states runs the whole model in memory, which an
    out-of-core node does not hold: "auto" leaves the phase out there, "on" is refused."""
    if isinstance(trainer, OutOfCoreTrainer):
        if cfg.states.federate == "on":
            raise ConfigError(
                f"{cfg.source}: states.federate 'on' needs the model in memory, and "
                f"train.memory_budget_mb = {cfg.train.memory_budget_mb} streams it out of "
                'core; raise the budget or set states.federate = "off"'
            )
        return None
    return plan_states(cfg, loaded, None if trainer is None else trainer.model)


def make_trainer(
    cfg: Config, loaded: LoadedTask, settings: TrainSettings
) -> LocalTrainer | OutOfCoreTrainer:
    """In memory, unless train.memory_budget_mb is set and the model's weights, gradients
    and inner optimizer state exceed it: then out of core, streamed from the data dir."""
    t = cfg.train
    partition, nodes = t.partition_index, cfg.run.nodes
    budget = t.memory_budget_mb << 20
    if budget:
        pin_allocator()  # before the model is built (see fflnode.train.outofcore)
    # A task that initialises stage by stage is sized from its skeleton (no storage), and
    # streamed out of core without ever being whole in memory.
    staged = build_skeleton(loaded, settings.seed) if budget else None
    model = build_model(loaded, settings.seed) if staged is None else staged[0]
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batches = BatchStream(lambda: loaded.task.train_data(partition, nodes, settings.seed))  # type: ignore[union-attr]
    if not budget or in_memory_bytes(numel, settings.inner_optimizer) <= budget:
        if staged is not None:  # it fits after all: the skeleton, made whole
            model = materialize_model(loaded, *staged, settings.seed)
        return LocalTrainer(loaded, model, settings, batches)
    chain = task_chain(loaded, model) if staged is None else staged[1]
    if chain is None:
        need = in_memory_bytes(numel, settings.inner_optimizer)
        raise ConfigError(
            f"{cfg.source}: the model needs {need >> 20} "
            f"MiB in memory, over train.memory_budget_mb = {t.memory_budget_mb}, and task "
            f"{t.task!r} declares no blocks() to stream it by (fflnode.train.task)"
        )
    check_rounds_stream(cfg)
    trainer = OutOfCoreTrainer(
        loaded,
        model,
        chain,
        settings,
        batches,
        directory=cfg.data_dir / OUTOFCORE_DIR,
        memory_budget=budget,
        micro_batch=t.micro_batch,
        backend=cfg.prism.backend,
        chunk_elems=cfg.exchange.chunk_elems,  # the round passes go chunk by chunk
        round_held=lambda numel: held_encodings(cfg, numel),
        sample_batch=next(iter(loaded.task.train_data(partition, nodes, settings.seed))),  # type: ignore[union-attr]
    )
    if cfg.run.rounds and not trainer.streams_rounds:
        trainer.close()
        raise ConfigError(
            f"{cfg.source}: task {t.task!r}'s blocks() are not contiguous ranges of the "
            "federated parameters in canonical (name) order, so its rounds cannot stream "
            "chunk by chunk from the block file and would hold the whole Delta in memory: "
            "name the parameters so that each stage's sort together"
        )
    return trainer


def check_rounds_stream(cfg: Config) -> None:
    """An out-of-core node's rounds must go chunk by chunk from its block file: the plain
    mean of all-gathered Deltas over the complete graph (fflnode.rounds `_streams`). A
    reduce-scatter, gossip or robust round holds |θ|-sized vectors in RAM, past any
    budget that made the node stream; refused at load rather than run out of memory."""
    e, r = cfg.exchange, cfg.run
    why = (
        "its rounds reduce-scatter (exchange.scheme 'auto' resolves to it for the plain "
        'mean); set exchange.scheme = "all-gather", every node the same'
        if reduce_scatters(cfg)
        else f"run.topology {r.topology!r} gossips (use 'complete')"
        if r.topology != "complete"
        else f"exchange.robust {e.robust!r} needs whole Deltas (use 'none')"
        if e.robust != "none"
        else f"adversary.mode {cfg.adversary.mode!r} rewrites whole Deltas"
        if cfg.adversary.mode != "none"
        else None
    )
    if why is not None and r.rounds:
        raise ConfigError(
            f"{cfg.source}: train.memory_budget_mb = {cfg.train.memory_budget_mb} streams the "
            f"model out of core, but {why}: such a round holds the whole Delta in memory"
        )


def held_encodings(cfg: Config, numel: int) -> int:
    """Bytes of encoded Deltas an all-gather round keeps in RAM: this node's own for the
    last KEEP_ROUNDS rounds (peers may still pull them) and one from each peer (kept
    until the mean is formed), each |θ| encoded chunk by chunk."""
    from fflnode.codecs import ChunkContext
    from fflnode.exchange import KEEP_ROUNDS

    codec = codec_of(cfg)

    def encoded(n: int) -> int:  # a chunk's encoding depends on its length only
        return codec.encode(torch.zeros(n), ChunkContext(cfg.run.seed, 0, 0, n)).wire_bytes

    full, rest = divmod(numel, cfg.exchange.chunk_elems)
    one = full * encoded(cfg.exchange.chunk_elems) if full else 0
    one += encoded(rest) if rest else 0
    # A lone node holds one more for a moment: the new encoding before publish drops
    # the oldest.
    return (KEEP_ROUNDS + max(cfg.run.nodes - 1, 1)) * one


def store_options(cfg: Config) -> dict[str, object]:
    """Prism options from [prism]: the backend, and the queue depth the pool allows."""
    from fflnode.prism.stream import depth_for_pool

    p = cfg.prism
    return {"backend": p.backend, "depth": depth_for_pool(p.pool_mb << 20)}


__all__ = ["Composition", "codec_of", "compose", "store_options"]
