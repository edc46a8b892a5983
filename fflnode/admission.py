"""Admission: a peer becomes a member only if it proves it belongs to this run.

Theory of operation. Everything that must be identical on every participant (the seed,
the number of nodes and rounds, the topology, the task and its options, the model's
parameter layout, the training recipe, the exchange and merge settings) is summarised
as one short digest per group, the run descriptor. Every heartbeat carries its sender's
descriptor; a peer whose descriptor differs from ours is refused, with one line that
names the group that differs ("its model layout differs"), so a misconfigured node, a
model that does not match its peers or a stranger who merely learnt the run id never
becomes a member, and the mismatch shows at the start barrier, not at the merge.

A closed run adds a run secret (`access.run_secret_file`): each heartbeat then also
carries HMAC-SHA256(secret, domain || sender peer ID || descriptor). Pubsub messages are
signed by their origin, so a proof cannot be lifted from another peer's heartbeat and
reused under a different identity, and the secret itself never travels. Without a
secret (an open run) anyone who knows the run's settings can compute the descriptor:
what an open run admits, and cannot prevent, is documented in docs/architecture.md.

Pure: no trio, no libp2p. Peers are raw peer-ID bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass

# Bytes of each group digest: 64 bits make an accidental collision between two different
# settings of one group a 2**-64 event, at 10 bytes per group on every heartbeat.
GROUP_DIGEST_BYTES = 8
PROOF_BYTES = 32  # HMAC-SHA256
MAX_GROUPS = 16  # groups a heartbeat may carry (the wire bounds it too)
MAX_GROUP_NAME = 16
PROOF_DOMAIN = b"fflnode-admit/1\x00"
# Run secrets are read from a file like the psk: 32 random bytes as 64 hex characters.
SECRET_HEX_CHARS = 64
# What each group covers, for the line that refuses a peer.
GROUP_MEANING = {
    "seed": "run seed",
    "size": "number of nodes and rounds",
    "topology": "topology",
    "task": "task and its options",
    "layout": "model parameter layout",
    "recipe": "training recipe",
    "exchange": "exchange settings",
    "merge": "merge settings",
    "states": "state federation settings",
}


def group_digest(value: object) -> bytes:
    """The digest of one group's settings: canonical JSON, blake2b-64."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=GROUP_DIGEST_BYTES).digest()


@dataclass(frozen=True)
class Refusal:
    """Why a peer was not admitted: the differing group, or the run secret."""

    field: str
    text: str


class Admission:
    """This node's run descriptor and secret; checks peers' claims against them."""

    def __init__(self, groups: Mapping[str, object], secret: bytes | None = None) -> None:
        unknown = set(groups) - set(GROUP_MEANING)
        if unknown:
            raise ValueError(f"unknown admission groups {sorted(unknown)}")
        self.groups = dict(groups)
        self.descriptor = {name: group_digest(v) for name, v in sorted(groups.items())}
        self.secret = secret

    def proof(self, peer: bytes, descriptor: Mapping[str, bytes]) -> bytes:
        assert self.secret is not None
        msg = PROOF_DOMAIN + len(peer).to_bytes(2, "big") + peer
        for name in sorted(descriptor):
            msg += name.encode() + b"\x00" + descriptor[name]
        return hmac.new(self.secret, msg, hashlib.sha256).digest()

    def heartbeat_fields(self, me: bytes) -> dict[str, object]:
        """What our heartbeats carry: the descriptor, and the proof in a closed run."""
        fields: dict[str, object] = {"admit": dict(self.descriptor)}
        if self.secret is not None:
            fields["proof"] = self.proof(me, self.descriptor)
        return fields

    def check(self, peer: bytes, admit: Mapping[str, bytes], proof: bytes | None) -> Refusal | None:
        """None when `peer`'s heartbeat claims exactly our run; else what differs.

        `admit` and `proof` come from a schema-checked heartbeat (wire.py bounds them)."""
        for name in self.descriptor:
            if admit.get(name) != self.descriptor[name]:
                what = GROUP_MEANING[name]
                missing = "does not state its" if name not in admit else "has a different"
                return Refusal(name, f"it {missing} {what} ({name})")
        extra = sorted(set(admit) - set(self.descriptor))
        if extra:
            return Refusal(extra[0], f"it states settings this node does not have ({extra[0]})")
        if self.secret is not None:
            if proof is None:
                return Refusal("secret", "it does not prove it holds the run secret")
            if not hmac.compare_digest(proof, self.proof(peer, admit)):
                return Refusal("secret", "its proof of the run secret is wrong")
        return None


def parse_secret(text: str, where: str) -> bytes:
    """A run secret file's contents (64 hex characters) as bytes; ValueError otherwise."""
    key = text.strip()
    if len(key) != SECRET_HEX_CHARS or any(c not in "0123456789abcdefABCDEF" for c in key):
        raise ValueError(f"{where} must hold {SECRET_HEX_CHARS} hex characters (32 bytes)")
    return bytes.fromhex(key)


__all__ = ["GROUP_MEANING", "Admission", "Refusal", "group_digest", "parse_secret"]
