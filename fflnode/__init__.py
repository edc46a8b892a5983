"""fflnode: a peer-to-peer daemon for Fluid Federated Learning.

One node is one process running one trio event loop: Prism weight streaming,
projection workers, a py-libp2p gossip layer and a trainer share one nursery.
See docs/architecture.md for what each module owns.
"""

__version__ = "0.1.0"
