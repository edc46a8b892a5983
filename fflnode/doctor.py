"""`fflnode doctor`: what this machine gives a node, and why each choice was made.

Prints one line per fact: versions, the Prism I/O backend and the reason for it,
io_uring and memlock limits (from Prism's own report), CUDA, the yamux tuning in
force. Exit 0 always: it reports, it does not judge (a node runs on every backend).
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata


def lines() -> list[str]:
    out = [
        f"fflnode {metadata.version('fflnode')} on Python {platform.python_version()} "
        f"({platform.machine()}, Linux {platform.release()})",
    ]
    for dist in ("torch", "libp2p", "trio", "msgpack", "numpy"):
        try:
            out.append(f"  {dist:<8} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            out.append(f"  {dist:<8} MISSING")
    from fflnode.prism import backend_report

    out.append("prism (weight streaming):")
    out.extend(f"  {line}" for line in backend_report(os.environ.get("FFLNODE_PRISM_BACKEND")))
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        out.append(f"cuda: {len(names)} device(s): {', '.join(names)}; projections run there")
    else:
        out.append("cuda: not available; projections and training run on the CPU")
    from fflnode.p2p import host

    out.append(
        f"libp2p: Noise + yamux over TCP; yamux MAX_MESSAGE_SIZE {host.YAMUX_MAX_MESSAGE_SIZE}, "
        f"PY_YAMUX_RELEASE_ON_READ={os.environ.get('PY_YAMUX_RELEASE_ON_READ')}"
    )
    return out


def main() -> int:
    for line in lines():
        print(line)
    sys.stdout.flush()
    return 0
