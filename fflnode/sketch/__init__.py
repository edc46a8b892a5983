"""Holographic slicing: seeded projections every node regenerates, and what uses them.

Owns the shared-randomness transforms (sans-IO: tensors in, tensors out, no trio, no
sockets) and the workers that run them off the event loop:

* `rng`          the int32 counter hash behind all shared randomness (StreamKey, ChunkSeed)
* `hadamard`     the randomized Hadamard rotation of a chunk and its exact inverse
* `countsketch`  the shift-fold count sketch: linear, summable, heavy-hitter recovery
* `dense`        a regenerated dense Gaussian projection (the JL baseline) and the JL bound
* `workers`      ProjectionPool: transforms in worker threads / CUDA streams, bounded
* `model_sketch` sketch a safetensors model of any size with bounded memory

The codecs built on them live in fflnode.codecs (holo, topk, sketch).
"""
