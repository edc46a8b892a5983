"""Build the optional native io_uring reader (native/uring.c) as fflnode.prism._uring.

The extension links the system liburing. When liburing's header is missing the package
still installs (Prism then uses its thread/preadv fallback) unless FFLNODE_REQUIRE_NATIVE=1,
which the Makefile and CI set so that a missing native build fails loudly there.
"""

import os
import sys
from pathlib import Path

from setuptools import Extension, setup

HERE = Path(__file__).parent
SOURCE = HERE / "native" / "uring.c"
HEADER_DIRS = ["/usr/include", "/usr/local/include"]


def liburing_available() -> bool:
    return any(Path(d, "liburing.h").exists() for d in HEADER_DIRS)


ext_modules = []
if SOURCE.exists() and liburing_available():
    ext_modules.append(
        Extension(
            "fflnode.prism._uring",
            sources=[str(SOURCE.relative_to(HERE))],
            libraries=["uring"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror"],
        )
    )
elif os.environ.get("FFLNODE_REQUIRE_NATIVE") == "1":
    sys.exit(
        "fflnode: FFLNODE_REQUIRE_NATIVE=1 but liburing.h was not found: "
        "install liburing-dev (apt-get install liburing-dev) or unset the variable"
    )

setup(ext_modules=ext_modules)
