"""The training config TokenHSI users know, validated once at the entry point.

`cfg_train` yaml: `use_wandb`, a `wandb:` block (project, entity, name, group, tags, notes, mode),
a `relay:` block (endpoint, spill_dir, keys, finish_timeout, histograms_every, console) and rl_games'
`params:`. `cfg_env` yaml: an `env:` block (task, num_envs). Unknown or duplicate keys, wrong types,
and `use_wandb`/`wandb`/`relay` placed under `params:` are errors that name the key and the file.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from relay.integrations.tokenhsi import refuse_misplaced
from relay.yamlfile import ConfigError, load_yaml


@dataclass(frozen=True)
class WandbSettings:
    project: str = "tokenHSI"
    entity: Optional[str] = None
    name: Optional[str] = None
    group: Optional[str] = None
    tags: list = field(default_factory=list)
    notes: Optional[str] = None
    mode: Optional[str] = None


@dataclass(frozen=True)
class RelaySettings:
    endpoint: Optional[str] = None
    spill_dir: Optional[str] = None
    keys: Optional[str] = None     # CurveZMQ client key directory (`relay keys new`); null: $RELAY_CLIENT_KEYS
    finish_timeout: float = 30.0
    histograms_every: int = 0      # every N epochs, histograms of the rollout's actions and rewards; 0: none
    console: bool = True           # the trainer's stdout/stderr to the run's Logs (relay.console)
    provenance: bool = True        # the trainer node's provenance, once per run (docs/trainer.md)
    system_metrics: float = 15.0   # seconds between system metrics samples; 0: none


@dataclass(frozen=True)
class EnvSettings:
    task: str = "PointTraj"
    num_envs: int = 256


@dataclass(frozen=True)
class TrainConfig:
    name: str                      # the cfg_train file's name without .yaml
    use_wandb: bool
    wandb: WandbSettings
    relay: RelaySettings
    env: EnvSettings
    params: dict                   # rl_games' own block, passed through
    train_yaml: dict               # the cfg_train file as loaded (the W&B config holds it whole)
    env_yaml: dict                 # the cfg_env file as loaded

    def reporting(self):
        """The `use_wandb`, `wandb:` and `relay:` blocks as the relay's TokenHSI integration reads them."""
        from relay.integrations.tokenhsi import Reporting

        return Reporting(self.use_wandb, {k: v for k, v in asdict(self.wandb).items() if v is not None},
                         {k: v for k, v in asdict(self.relay).items() if v is not None})


TYPES = {"str": str, "int": int, "float": (int, float), "bool": bool, "list": list, "dict": dict}


def _block(cls, values: Any, where: str):
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError("%s must be a mapping, got %s" % (where, type(values).__name__))
    known = {f.name: f for f in fields(cls)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError("%s: unknown key %r (known: %s)" % (where, key, ", ".join(sorted(known))))
        expected = known[key].type.replace("Optional[", "").rstrip("]")
        if value is None and known[key].type.startswith("Optional"):
            continue
        if not isinstance(value, TYPES[expected]) or (expected in ("int", "float") and isinstance(value, bool)):
            raise ConfigError("%s.%s must be %s, got %r (%s)" % (where, key, expected, value, type(value).__name__))
    return cls(**values)


def load(cfg_train: str, cfg_env: str) -> TrainConfig:
    train = load_yaml(cfg_train)
    env = load_yaml(cfg_env)
    allowed = {"use_wandb", "wandb", "relay", "params"}
    unknown = sorted(set(train) - allowed)
    if unknown:
        raise ConfigError("%s: unknown top-level key(s) %s (known: %s)" % (cfg_train, unknown, ", ".join(sorted(allowed))))
    if set(env) - {"env"}:
        raise ConfigError("%s: unknown top-level key(s) %s (known: env)" % (cfg_env, sorted(set(env) - {"env"})))
    if not isinstance(train.get("use_wandb", False), bool):
        raise ConfigError("%s: use_wandb must be True or False" % cfg_train)
    if not isinstance(train.get("params"), dict):
        raise ConfigError("%s: params (rl_games' block) is missing" % cfg_train)
    try:
        refuse_misplaced(train["params"], "params", cfg_train)
    except ValueError as exc:
        raise ConfigError(str(exc))
    name = os.path.splitext(os.path.basename(cfg_train))[0]
    return TrainConfig(name=name, use_wandb=train.get("use_wandb", False),
                       wandb=_block(WandbSettings, train.get("wandb"), "%s: wandb" % cfg_train),
                       relay=_block(RelaySettings, train.get("relay"), "%s: relay" % cfg_train),
                       env=_block(EnvSettings, env.get("env"), "%s: env" % cfg_env),
                       params=train["params"], train_yaml=train, env_yaml=env)
