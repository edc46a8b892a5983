"""Prism: the SSD as a slow memory tier.

Model weights live on NVMe as safetensors files and are streamed in byte ranges into a
bounded pool of aligned buffers, so a node's memory is bounded by the pool whatever the
model size. `safetensors` parses and validates the format (sans-IO); `writer` writes
checkpoints atomically; the reader backends stream ranges.
"""
