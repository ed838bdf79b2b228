"""Where an uploader's rows go. `wandb.py` is the W&B sink, and the only module of the relay that
imports wandb: every workaround for the SDK lives there. `wandb_api.py` is the relay's own queries
to W&B (no SDK)."""
