"""Whether reporting is switched off: the one place that reads `WANDB_MODE` on the trainer side.

`WANDB_MODE=disabled` in a trainer's environment, or a run's own `mode="disabled"`, means nothing
is reported: the client hands back a DisabledRun, the rl_games observer wraps nothing, and a
TokenHSI run.py keeps its own observer alone (relay.integrations.tokenhsi). Standard library only (Python 3.8).
"""
from __future__ import annotations

import os
from typing import Optional

DISABLED = "disabled"


def reporting_disabled(mode: Optional[str] = None) -> bool:
    """True when `mode` (a run's W&B mode, None when it sets none) or WANDB_MODE is `disabled`."""
    return mode == DISABLED or os.environ.get("WANDB_MODE") == DISABLED
