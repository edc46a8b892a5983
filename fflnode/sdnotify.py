"""systemd's notify protocol: READY=1, STATUS=..., WATCHDOG=1, STOPPING=1.

The daemon tells its supervisor how it is doing by sending newline-separated KEY=VALUE
datagrams to the unix socket named in $NOTIFY_SOCKET (a filesystem path, or an abstract
socket when it starts with '@'). Without the variable every call is a no-op, so the same
daemon runs under systemd, under the testnet (which listens on such a socket itself to
learn when each node is ready and how far it got) and by hand.

Rule: notifying never blocks and never fails the daemon: a supervisor that went away
must not take the node down with it. Failures are counted and logged once.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

ENV = "NOTIFY_SOCKET"
WATCHDOG_ENV = "WATCHDOG_USEC"
MAX_DATAGRAM = 4096  # systemd reads at most a page per notification


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        self.address = address if address is not None else os.environ.get(ENV)
        self.failures = 0
        self._sock: socket.socket | None = None
        if self.address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: str | int) -> bool:
        """Send one notification, e.g. send(READY=1, STATUS="listening")."""
        if self._sock is None or self.address is None:
            return False
        text = "\n".join(f"{k}={str(v).replace(chr(10), ' ')}" for k, v in fields.items())
        data = text.encode("utf-8")[:MAX_DATAGRAM]
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            self._sock.sendto(data, target)
            return True
        except OSError as e:
            self.failures += 1
            if self.failures == 1:
                log.warning("cannot notify %s: %s (further failures not logged)", self.address, e)
            return False

    def ready(self, status: str) -> bool:
        return self.send(READY=1, STATUS=status, MAINPID=os.getpid())

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def stopping(self, status: str = "stopping") -> bool:
        return self.send(STOPPING=1, STATUS=status)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval_s() -> float | None:
    """Half the supervisor's watchdog timeout (systemd's advice), or None when unset."""
    raw = os.environ.get(WATCHDOG_ENV)
    pid = os.environ.get("WATCHDOG_PID")
    if not raw or (pid and pid != str(os.getpid())):
        return None
    try:
        usec = int(raw)
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None
