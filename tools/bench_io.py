#!/usr/bin/env python3
"""Prism I/O benchmark: see fflnode/prism/bench.py (also `fflnode bench io FILE`).

Usage: .venv/bin/python tools/bench_io.py [FILE] [--size-gib 2] [--repeats 3] [--depth 8]
"""

import sys

from fflnode.prism.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
