"""Whether reporting is switched off: the one place that reads `WANDB_MODE` on the trainer side.

`WANDB_MODE=disabled` in a trainer's environment, or a run's own `mode="disabled"`, means nothing
is reported: the client hands back a DisabledRun (defined here, a run whose every call does
nothing), the rl_games observer wraps nothing, and a TokenHSI run.py keeps its own observer alone
(relay.integrations.tokenhsi). Standard library only (Python 3.8).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

DISABLED = "disabled"


def reporting_disabled(mode: Optional[str] = None) -> bool:
    """True when `mode` (a run's W&B mode, None when it sets none) or WANDB_MODE is `disabled`."""
    return mode == DISABLED or os.environ.get("WANDB_MODE") == DISABLED


class DisabledRun:
    """What `start_run` returns when reporting is disabled (mode or WANDB_MODE=disabled)."""

    def __init__(self, run_id: str, name: Optional[str]):
        self.id = run_id
        self.name = name

    def log(self, metrics: Dict[str, Any], frame: Optional[int] = None, epoch: Optional[int] = None,
            namespace: Optional[str] = None) -> None:
        pass

    def log_checkpoint(self, path: str, metadata: Optional[Dict[str, Any]] = None,
                       aliases: Optional[List[str]] = None) -> None:
        pass

    def summary(self, values: Dict[str, Any]) -> None:
        pass

    def finish(self, exit_code: int = 0, timeout: float = 10.0) -> Dict[str, Any]:
        return {"run": self.id, "delivered": True, "spill_file": None, "acked": 0, "spilled": 0,
                "errors": 0, "disabled": True}
