"""The I/O shell over py-libp2p: host construction, framed streams, membership.

Everything here only moves bytes and waits; what the bytes mean is fflnode.wire's job.
"""
