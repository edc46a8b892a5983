"""Per-peer rate-limited logging of what peers did wrong: one line, then a count.

Owns the promise "log volume per offending peer is bounded". A peer that sends 16,000
bad messages in ten seconds must not write 16,000 lines (it did: 58 MB of log). For each
peer the first line is written at its level; further lines about that peer within
WINDOW_S are counted, not written, and the next line after the window says how many were
held back, by kind. So a peer costs at most one line per WINDOW_S (plus its first), and
an operator still sees that it keeps misbehaving and how much.

Memory is bounded too: at most MAX_PEERS peers are tracked; the least recently logged is
forgotten first (its next line is then written at once, which costs one line). Pure: the
clock is passed in, so tests drive it without sleeping.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from fflnode.errors import bounded, short_peer

# One line per peer per minute: a flood is visible in the log within a minute and costs
# ~1.4k lines a day per peer, however fast it sends.
WINDOW_S = 60.0
# Peers tracked at once: a run has at most wire.MAX_MEMBERS members; identities cost an
# attacker nothing, so the table is capped and old entries are evicted.
MAX_PEERS = 1024


@dataclass
class _Entry:
    last_written: float
    held: dict[str, int] = field(default_factory=dict)  # kind -> lines held back


class PeerLog:
    """Rate-limited log lines keyed by peer."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        window_s: float = WINDOW_S,
        max_peers: int = MAX_PEERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.window_s = window_s
        self.max_peers = max_peers
        self.clock = clock
        self._peers: OrderedDict[str, _Entry] = OrderedDict()
        self.written = 0  # lines written (for tests and metrics)
        self.suppressed = 0  # lines held back

    def log(self, peer: str, kind: str, text: str, level: int = logging.WARNING) -> bool:
        """Write `text` about `peer` unless a line about it was written within the window;
        `kind` labels what is counted meanwhile. True when the line was written."""
        now = self.clock()
        entry = self._peers.get(peer)
        if entry is not None and now - entry.last_written < self.window_s:
            entry.held[kind] = entry.held.get(kind, 0) + 1
            self.suppressed += 1
            return False
        held = ""
        if entry is not None and entry.held:
            counts = ", ".join(f"{k} {n}" for k, n in sorted(entry.held.items()))
            held = f" ({sum(entry.held.values())} similar lines held back: {counts})"
        if entry is None:
            entry = self._peers[peer] = _Entry(now)
            while len(self._peers) > self.max_peers:
                self._peers.popitem(last=False)
        entry.last_written = now
        entry.held = {}
        self._peers.move_to_end(peer)
        self.logger.log(level, "%s: %s%s", short_peer(peer), bounded(text), held)
        self.written += 1
        return True


__all__ = ["MAX_PEERS", "WINDOW_S", "PeerLog"]
