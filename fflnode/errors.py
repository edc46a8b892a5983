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


# A logged detail about untrusted input is at most this many characters: enough to
# name a field and show the start of a bad value, never a peer-sized log line.
MAX_DETAIL_CHARS = 240
# Characters of one untrusted string `shown` in a message.
MAX_SHOWN_CHARS = 48
# Characters of an unanticipated exception's message in a log line about the peer
# whose input raised it: its gist, well inside MAX_DETAIL_CHARS.
MAX_ERROR_CHARS = 120


def shown(value: object) -> str:
    """A bounded, escaped description of an untrusted value, for error messages.

    Never `repr` a peer's value: a container nested a thousand deep makes `repr` raise
    RecursionError, and a long string floods the log. Strings are cut to MAX_SHOWN_CHARS
    and escaped to printable ASCII; containers and bytes are shown by type and length
    only; nothing here recurses.
    """
    if value is None or isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        text = str(value) if -(10**30) < value < 10**30 else f"<int of {value.bit_length()} bits>"
        return text
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        cut = value[:MAX_SHOWN_CHARS].encode("unicode_escape").decode("ascii")
        return f"'{cut}'" + (f"... ({len(value)} chars)" if len(value) > MAX_SHOWN_CHARS else "")
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if isinstance(value, list | tuple | dict | set | frozenset):
        return f"<{type(value).__name__} of {len(value)}>"
    return f"<{type(value).__name__}>"


def error_kind(error: BaseException, limit: int = MAX_ERROR_CHARS) -> str:
    """An exception's type and its message, bounded: what a log line about untrusted
    input says of an exception nobody anticipated."""
    return f"{type(error).__name__}: {bounded(str(error), limit)}"


def bounded(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    """`text` cut to `limit` characters with non-printable characters escaped."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class WireError(FflError):
    """A message from a peer was rejected.

    `reason` is a short stable slug (e.g. "oversized", "schema", "hash") used as a metrics
    label; the message text names the peer and says what was wrong, bounded and escaped
    (`bounded`), however the detail was built.
    """

    def __init__(self, peer: str, reason: str, detail: str) -> None:
        self.peer = peer
        self.reason = reason
        self.detail = bounded(detail)
        super().__init__(f"{short_peer(peer)}: {reason}: {self.detail}")


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
