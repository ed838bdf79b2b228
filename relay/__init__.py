"""tokenhsi-relay: get TokenHSI training metrics and checkpoints into W&B without slowing training.

Trainer side: `from relay.client import RelayClient`; media for `run.log`: `relay.Image`,
`relay.Video`, `relay.Audio`, `relay.Html`, `relay.Histogram` (relay/media.py). Relay side:
`relay serve` (see README).
"""
from relay.media import Audio, Histogram, Html, Image, Video  # noqa: F401 (the package's API)

__version__ = "0.1.0"
