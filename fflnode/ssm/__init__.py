"""F-SSD: Mamba-2 / SSD (state-space duality) layers and the algebra of federating their states.

`ssd` holds the scan (chunked dual form, with a plain sequential recurrence as its oracle)
and the mixer layer; `model` the small SSD networks built from it; `states` the per-layer
recurrent state, its exact composition, canonical merges and strict (de)serialization;
`streamed` runs a model whose weights do not fit in memory, one layer at a time.
Everything here is sans-IO except `streamed`, which reads weight files.
"""
