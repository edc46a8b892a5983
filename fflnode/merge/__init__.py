"""The final global merge (GradsSharding): exact, sharded, hash-verified.

`plan` and `reduce` are sans-IO: which peer owns which shard, and the bit-exact canonical
reduction. `protocol` runs them over libp2p.
"""
