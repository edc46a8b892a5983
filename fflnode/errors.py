"""Typed errors: one class per thing that can go wrong, each message says what and where.

Rule: a message names the offending object (file and key, peer and reason, shard and
member) and, where there is one, what to do. Callers catch these classes, never bare
ValueError. The daemon turns a ConfigError into one line and exit code 2.
"""

from __future__ import annotations


class FflError(Exception):
    """Base of every error fflnode raises on purpose."""


class ConfigError(FflError):
    """A configuration file is unreadable, has an unknown key, a wrong type or a missing field."""


class IdentityError(FflError):
    """The node's identity key is unreadable, malformed or has unsafe permissions."""


class WireError(FflError):
    """A message from a peer was rejected.

    `reason` is a short stable slug (e.g. "oversized", "schema", "hash") used as a metrics
    label; the message text names the peer and says what was wrong.
    """

    def __init__(self, peer: str, reason: str, detail: str) -> None:
        self.peer = peer
        self.reason = reason
        self.detail = detail
        super().__init__(f"{short_peer(peer)}: {reason}: {detail}")


class FormatError(FflError):
    """A file on disk (safetensors header, checkpoint) is corrupt, hostile or inconsistent."""


class MergeError(FflError):
    """The final global merge could not complete exactly; never downgraded to a warning."""


def leaf_error(error: BaseException) -> BaseException:
    """The first non-group exception inside nested exception groups (what went wrong)."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


class PeerUnavailable(FflError):
    """A peer could not be reached, or did not answer within its deadline."""


def short_peer(peer: str) -> str:
    """A peer ID shortened for messages: enough characters to tell peers apart in a log."""
    peer = str(peer)
    return peer if len(peer) <= 16 else f"{peer[:8]}…{peer[-6:]}"


class PrismError(FflError, OSError):
    """Reading weights from disk failed in the kernel (open, io_uring, preadv).

    An OSError too: `errno` is the kernel's error number and `filename` the file being
    read, so callers can branch on errno (EINVAL from O_DIRECT, ENOMEM from buffer
    registration) while the message says which operation failed where.
    """
