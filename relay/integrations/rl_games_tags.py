"""rl_games' TensorBoard tags as W&B names, and an rl_games config as the wire can carry it.

Tag mapping (TensorBoard tag -> W&B name; `S` is one of the axis suffixes `frame`, `step`, `iter`,
`time`, which rl_games uses to write one value three times, against frame, epoch and wall time):

    rewards/S, rewards0/S                 -> rewards/mean        (rl_games >= 1.6 / TokenHSI)
    rewards{i}/S (i >= 1)                 -> rewards/{i}
    shaped_rewards/S, shaped_rewards0/S   -> shaped_rewards/mean
    shaped_rewards{i}/S (i >= 1)          -> shaped_rewards/{i}
    episode_lengths/S                     -> episode_lengths/mean
    scores/S (and scores/mean)            -> scores/mean
    successes/consecutive_successes/S (and /mean, TokenHSI's RLGPUAlgoObserver)
                                          -> successes/consecutive_successes/mean
    reward_{task}/S (TokenHSI's multi-task agents)
                                          -> rewards/{task}
    any other X/S (X not one of the four
      prefixes below), e.g. Episode/len/frame -> X (suffix stripped: Episode/len)
    performance/*, losses/*, info/*, eval/*  -> unchanged, e.g. losses/a_loss, info/kl,
      performance/step_fps, info/epochs (just a metric; the axes come from the hook), and also
      info/time (a metric that happens to be called `time` is not a suffix)
    any tag without an axis suffix        -> unchanged (Episode/foo, diagnostics, ...)
    rl_games >= 1.5's renamed timings     -> TokenHSI's (rl_games 1.1.4) names:
      performance/step_inference_rl_update_fps -> performance/total_fps,
      performance/rl_update_time -> performance/update_time,
      performance/step_inference_time -> performance/play_time

The three writes of one value land on one name in one row, so W&B gets each value once per epoch.
When a name is written several times in an epoch, the last value wins.

`sanitize_config` makes the run's W&B config out of rl_games' `params['config']`.

Standard library only at import time (msgpack is looked up to size the config); Python 3.8.
"""
from __future__ import annotations

import logging
import re
import sys
from typing import Any, Dict

log = logging.getLogger("relay.rl_games")

AXIS_SUFFIXES = ("frame", "step", "iter", "time")
KEPT_PREFIXES = ("performance", "losses", "info", "eval")
MEAN_NAMES = ("rewards", "shaped_rewards", "episode_lengths", "scores", "successes/consecutive_successes")
_INDEXED = re.compile(r"^(rewards|shaped_rewards)(\d+)$")
_TASK_REWARD = re.compile(r"^reward_(.+)$")
# A float YAML 1.2 reads as a number but YAML 1.1 (PyYAML) reads as a string: `2e-5`, `1E6`.
_YAML11_STRING_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")

CONFIG_MAX_LEVEL = 6          # deeper containers become str (the config sits 2 levels down a message of 8)
CONFIG_MAX_STR = 8192         # longer strings in the config are cut
CONFIG_MAX_BYTES = 256 * 1024  # the open record must fit in one 1 MiB frame with room to spare


# rl_games >= 1.5 renamed the timing scalars TokenHSI users know (rl_games 1.1.4 names on the right).
RENAMED = {"performance/step_inference_rl_update_fps": "performance/total_fps",
           "performance/rl_update_time": "performance/update_time",
           "performance/step_inference_time": "performance/play_time"}


def map_tag(tag: str) -> str:
    """The W&B name for a TensorBoard tag written by an rl_games agent (see the module docstring)."""
    if tag in RENAMED:
        return RENAMED[tag]
    base, sep, last = tag.rpartition("/")
    if not sep or not base or last not in AXIS_SUFFIXES or base in KEPT_PREFIXES:
        return tag
    indexed = _INDEXED.match(base)
    if indexed:
        index = int(indexed.group(2))
        return "%s/%s" % (indexed.group(1), "mean" if index == 0 else index)
    task = _TASK_REWARD.match(base)
    if task:
        return "rewards/" + task.group(1)
    if base in MEAN_NAMES:
        return base + "/mean"
    return base


def sanitize_config(config: Any) -> Dict[str, Any]:
    """A copy of an rl_games config that the wire can carry: dicts with str keys, lists, numbers,
    str and None; everything else (objects, spaces, tensors) becomes its str(). A string that only
    YAML 1.1 leaves unparsed as a float (`learning_rate: 2e-5`) becomes the number it spells."""
    clean = _sanitize(config, 0)
    if not isinstance(clean, dict):
        clean = {"config": clean}
    try:
        import msgpack
        size = {key: len(msgpack.packb(value, use_bin_type=True)) for key, value in clean.items()}
    except Exception:  # pragma: no cover - msgpack is a dependency of the package
        return clean
    total = sum(size.values())
    for key in sorted(size, key=size.get, reverse=True):
        if total <= CONFIG_MAX_BYTES:
            break
        clean[key] = "<omitted: %d bytes>" % size[key]
        total -= size[key]
        log.warning("config entry %r (%d bytes) left out of the W&B config: the config is too large", key, size[key])
    return clean


def _sanitize(value: Any, level: int) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value) if -(1 << 63) <= value < (1 << 64) else str(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        if _YAML11_STRING_FLOAT.match(value):
            return float(value)
        return value if len(value) <= CONFIG_MAX_STR else value[:CONFIG_MAX_STR] + "..."
    if isinstance(value, dict) and level < CONFIG_MAX_LEVEL:
        out = {}
        for key, item in value.items():
            name = str(key)[:256] or "_"
            out[name] = _sanitize(item, level + 1)
        return out
    if isinstance(value, (list, tuple)) and level < CONFIG_MAX_LEVEL:
        return [_sanitize(item, level + 1) for item in value[:1000]]
    if _is_single_number(value):  # numpy scalars, 1-element arrays and tensors (once, at start)
        try:
            return _sanitize(value.item(), level)
        except Exception:
            pass
    try:
        text = str(value)
    except Exception:
        text = "<%s>" % type(value).__name__
    return text if len(text) <= CONFIG_MAX_STR else text[:CONFIG_MAX_STR] + "..."


def _is_single_number(value: Any) -> bool:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return value.numel() == 1
    return type(value).__module__ == "numpy" and getattr(value, "size", None) == 1
