"""tokenhsi-relay: get TokenHSI training metrics and checkpoints into W&B without slowing training.

Trainer side: `from relay.client import RelayClient`. Relay side: `relay serve` (see README).
"""
__version__ = "0.1.0"
