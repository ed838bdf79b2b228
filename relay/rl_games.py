"""rl_games integration, under the name the README, the docs and TokenHSI checkouts import:

    from relay.rl_games import MultiObserver, RelayAlgoObserver, observer_from_train_config

The code is in relay.integrations: rl_games (the observer, MultiObserver), rl_games_tags (the tag
table `map_tag`, `sanitize_config`), rl_games_writer (RelayWriter), rl_games_rows (rows and their
device values), rl_games_checkpoints (atomic saves); TokenHSI's training yaml -> an observer is
relay.integrations.tokenhsi. This module re-exports their public names.

Standard library only at import time, Python 3.8 (see relay.integrations.rl_games).
"""
from __future__ import annotations

from relay.integrations.rl_games import AlgoObserver, MultiObserver, RelayAlgoObserver
from relay.integrations.rl_games_checkpoints import atomic_save
from relay.integrations.rl_games_rows import Rows
from relay.integrations.rl_games_tags import (
    AXIS_SUFFIXES,
    CONFIG_MAX_BYTES,
    CONFIG_MAX_LEVEL,
    CONFIG_MAX_STR,
    KEPT_PREFIXES,
    MEAN_NAMES,
    RENAMED,
    map_tag,
    sanitize_config,
)
from relay.integrations.rl_games_writer import RelayWriter, install_writer
from relay.integrations.tokenhsi import observer_from_train_config
from relay.tensors import Transfer, Waiting, batch_to_python, start_transfer

__all__ = ["AXIS_SUFFIXES", "AlgoObserver", "CONFIG_MAX_BYTES", "CONFIG_MAX_LEVEL", "CONFIG_MAX_STR",
           "KEPT_PREFIXES", "MEAN_NAMES", "MultiObserver", "RENAMED", "RelayAlgoObserver", "RelayWriter", "Rows",
           "Transfer", "Waiting", "atomic_save", "batch_to_python", "install_writer", "map_tag",
           "observer_from_train_config", "sanitize_config", "start_transfer"]
