"""TokenHSI's run.py through the relay: its training yaml's blocks, the training run, the evaluation.

A TokenHSI checkout's `tokenhsi/run.py` reports through the relay with three lines in `main()`
(written by `relay tokenhsi patch`, or by hand):

    algo_observer = RLGPUAlgoObserver()
    relay_session = TokenHSIRelay(args, cfg, cfg_train)     # after `cfg, cfg_train, logdir = load_cfg(args)`
    algo_observer = relay_session.observer(algo_observer)
    ...
    runner.run(vargs)
    relay_session.after_run()

- The training yaml's `use_wandb`, `wandb:` and `relay:` blocks say whether and where to report
  (`reporting_from_train_config`); unknown keys, wrong types and these keys placed under `params:`
  stop the run with the key named.
- Training: `RelayAlgoObserver` (relay.integrations.rl_games) first, then TokenHSI's own observer. The W&B config
  is the whole training yaml (plain values; `2e-5`, a string to YAML 1.1, as the number), the env
  yaml under `cfg_env` and the command line under `args`. The run's name is `wandb.name`, else
  `--experiment`, else the training yaml's file name without `.yaml`.
- `--test --eval`: TokenHSI's players write `ObjectSet_test_{i}` results to
  `<checkpoint dir>/../metrics/<checkpoint name>/[<eval_task>/]metrics_<time>.json` and call no observer;
  `after_run` reads the files written since the session started and reports every number in them as
  `eval/{ObjectSet name}/{key}` to a run `<name>_test` whose config holds the checkpoint's path.

Trainer side: standard library and relay.modes only at import time (Python 3.8).
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple  # noqa: F401 (Tuple: in type comments)

from relay.modes import reporting_disabled

log = logging.getLogger("relay.integrations.tokenhsi")

WANDB_KEYS = ("project", "entity", "name", "group", "tags", "notes", "mode")
RELAY_KEYS = ("endpoint", "spill_dir", "keys", "finish_timeout", "histograms_every", "console", "provenance",
              "system_metrics")
NOT_SET = "Base"  # TokenHSI's default for --experiment and --checkpoint


class Reporting(object):
    """What a TokenHSI training yaml asks of the relay: its `use_wandb` flag, `wandb:` block and
    `relay:` block, validated (see `reporting_from_train_config`)."""

    def __init__(self, use_wandb, wandb, relay):
        # type: (bool, Dict[str, Any], Dict[str, Any]) -> None
        self.use_wandb = use_wandb
        self.wandb = wandb
        self.relay = relay

    @property
    def enabled(self):
        # type: () -> bool
        return self.use_wandb and not reporting_disabled(self.wandb.get("mode"))

    @property
    def finish_timeout(self):
        # type: () -> float
        value = self.relay.get("finish_timeout")
        return 30.0 if value is None else float(value)

    def run_name(self, where, experiment=None, config_name=None):
        # type: (str, Optional[str], Optional[str]) -> Optional[str]
        """`wandb.name`, else the `--experiment` name (TokenHSI's default 'Base' means none), else the
        training yaml's file name without `.yaml`, else `config_name`."""
        if self.wandb.get("name"):
            return self.wandb["name"]
        if experiment and experiment != "Base":
            return experiment
        stem, ext = os.path.splitext(os.path.basename(where or ""))
        if stem and ext in (".yaml", ".yml"):
            return stem
        return config_name

    def observer(self, name, config=None):
        # type: (Optional[str], Optional[Dict[str, Any]]) -> Any
        """The observer for a training run named `name` (reports nothing when reporting is off)."""
        from relay.integrations.rl_games import RelayAlgoObserver

        if not self.use_wandb:
            return RelayAlgoObserver(mode="disabled")
        w, r = self.wandb, self.relay
        return RelayAlgoObserver(project=w.get("project") or "tokenHSI", name=name, entity=w.get("entity"),
                                 group=w.get("group"), tags=w.get("tags"), notes=w.get("notes"), mode=w.get("mode"),
                                 endpoint=r.get("endpoint"), spill_dir=r.get("spill_dir"), keys=r.get("keys"),
                                 finish_timeout=self.finish_timeout, config=config,
                                 histograms_every=r.get("histograms_every") or 0, console=r.get("console", True),
                                 provenance=r.get("provenance"), system_metrics=r.get("system_metrics"))


def reporting_from_train_config(cfg_train, where="cfg_train"):
    # type: (Dict[str, Any], str) -> Reporting
    """Read and check the `use_wandb`, `wandb:` (project, entity, name, group, tags, notes, mode) and
    `relay:` (endpoint, spill_dir, keys, finish_timeout, histograms_every, console, provenance,
    system_metrics) keys of a TokenHSI `cfg_train` dict. Unknown keys, wrong types, and these keys
    placed under `params:` (where they would be ignored) raise ValueError naming the key; `where`
    names the file in that message."""
    if not isinstance(cfg_train, dict):
        raise ValueError("%s must be a mapping, got %s" % (where, type(cfg_train).__name__))
    refuse_misplaced(cfg_train.get("params"), "params", where)
    use_wandb = cfg_train.get("use_wandb", False)
    if not isinstance(use_wandb, bool):
        raise ValueError("%s: use_wandb must be True or False, got %r" % (where, use_wandb))
    wandb = _settings_block(cfg_train, "wandb", WANDB_KEYS, where)
    relay = _settings_block(cfg_train, "relay", RELAY_KEYS, where)
    for key in ("project", "entity", "name", "group", "notes", "mode"):
        _check_type(wandb, key, str, where + ": wandb")
    if not isinstance(wandb.get("tags") or [], list) or not all(isinstance(t, str) for t in wandb.get("tags") or []):
        raise ValueError("%s: wandb.tags must be a list of strings, got %r" % (where, wandb.get("tags")))
    if wandb.get("mode") not in (None, "online", "offline", "disabled"):
        raise ValueError("%s: wandb.mode must be online, offline or disabled, got %r" % (where, wandb["mode"]))
    _check_type(relay, "endpoint", str, where + ": relay")
    _check_type(relay, "spill_dir", str, where + ": relay")
    _check_type(relay, "keys", str, where + ": relay")
    _check_type(relay, "finish_timeout", (int, float), where + ": relay")
    every = relay.get("histograms_every")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 0):
        raise ValueError("%s: relay.histograms_every must be an int >= 0 (0: no histograms), got %r" % (where, every))
    if not isinstance(relay.get("console", True), bool):
        raise ValueError("%s: relay.console must be true or false, got %r" % (where, relay["console"]))
    if not isinstance(relay.get("provenance", True), bool):
        raise ValueError("%s: relay.provenance must be True or False, got %r" % (where, relay["provenance"]))
    _check_type(relay, "system_metrics", (int, float), where + ": relay")
    if (relay.get("system_metrics") or 0) < 0:
        raise ValueError("%s: relay.system_metrics must be seconds between samples (0: none), got %r"
                         % (where, relay["system_metrics"]))
    return Reporting(use_wandb, wandb, relay)


def observer_from_train_config(cfg_train, where="cfg_train", experiment=None, config=None):
    # type: (Dict[str, Any], str, Optional[str], Optional[Dict[str, Any]]) -> Any
    """The observer a TokenHSI `cfg_train` dict asks for (see `reporting_from_train_config`). The
    run's name is `wandb.name`, else `experiment` (the `--experiment` flag), else the yaml's file
    name in `where` without `.yaml`, else `params.config.name`. `config`: the W&B config (default:
    rl_games' `params.config`, as the agent sees it). With `use_wandb` false (or absent) the observer
    reports nothing."""
    reporting = reporting_from_train_config(cfg_train, where)
    settings = (cfg_train.get("params") or {}).get("config")
    config_name = settings.get("name") if isinstance(settings, dict) else None
    return reporting.observer(reporting.run_name(where, experiment, config_name), config)


def refuse_misplaced(value, path, where):
    # type: (Any, str, str) -> None
    """`use_wandb`, `wandb` and `relay` anywhere under `params:` are refused: rl_games would carry
    them silently and reporting would be off."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("use_wandb", "wandb", "relay"):
                raise ValueError("%s: %s.%s is misplaced: `%s` belongs at the top level of the training yaml, "
                                 "next to `params:` (move it there)" % (where, path, key, key))
            refuse_misplaced(item, "%s.%s" % (path, key), where)


def _settings_block(cfg_train, block, known, where):
    # type: (Dict[str, Any], str, Tuple[str, ...], str) -> Dict[str, Any]
    values = cfg_train.get(block)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError("%s: %s must be a mapping, got %s" % (where, block, type(values).__name__))
    for key in values:
        if key not in known:
            raise ValueError("%s: %s: unknown key %r (known: %s)" % (where, block, key, ", ".join(known)))
    return values


def _check_type(values, key, kind, where):
    # type: (Dict[str, Any], str, Any, str) -> None
    value = values.get(key)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise ValueError("%s.%s has the wrong type: %r (%s)" % (where, key, value, type(value).__name__))


def training_config(cfg_train, cfg_env=None, args=None):
    # type: (Dict[str, Any], Optional[Dict[str, Any]], Any) -> Dict[str, Any]
    """The W&B config of a TokenHSI run: the training yaml as it was loaded, the env yaml under
    `cfg_env` (without the `args` TokenHSI's load_cfg puts there), the command line under `args`;
    as plain values (relay.integrations.rl_games_tags.sanitize_config)."""
    from relay.integrations.rl_games_tags import sanitize_config

    config = dict(cfg_train)
    if isinstance(cfg_env, dict):
        config["cfg_env"] = {key: value for key, value in cfg_env.items() if key != "args"}
    if args is not None:
        config["args"] = dict(vars(args)) if hasattr(args, "__dict__") else dict(args)
    return sanitize_config(config)


class TokenHSIRelay(object):
    """What a TokenHSI run.py reports through the relay (see the module docstring)."""

    def __init__(self, args, cfg, cfg_train):
        # type: (Any, Optional[Dict[str, Any]], Dict[str, Any]) -> None
        self.args = args
        where = getattr(args, "cfg_train", None) or "cfg_train"
        try:
            self.reporting = reporting_from_train_config(cfg_train, where)
        except ValueError as exc:
            print("error: %s" % exc, file=sys.stderr)
            raise SystemExit(2)
        self.started = time.time()
        settings = (cfg_train.get("params") or {}).get("config")
        config_name = settings.get("name") if isinstance(settings, dict) else None
        self.name = self.reporting.run_name(where, getattr(args, "experiment", None), config_name)
        self.config = training_config(cfg_train, cfg, args) if self.reporting.enabled else {}
        self.relay_observer = None  # type: Any

    @property
    def testing(self):
        # type: () -> bool
        return bool(getattr(self.args, "test", False) or getattr(self.args, "play", False))

    def observer(self, algo_observer):
        # type: (Any) -> Any
        """`algo_observer` with the relay's observer in front of it, for a training run that
        reports; `algo_observer` itself otherwise (reporting off, or --test/--play)."""
        if self.testing or not self.reporting.enabled:
            return algo_observer
        from relay.integrations.rl_games import MultiObserver

        self.relay_observer = self.reporting.observer(self.name, self.config)
        return MultiObserver(self.relay_observer, algo_observer)

    def after_run(self):
        # type: () -> Optional[Dict[str, Any]]
        """After `runner.run(vargs)`: with --test --eval, report the evaluation results the player
        wrote (None when there is nothing to report)."""
        if not (getattr(self.args, "test", False) and getattr(self.args, "eval", False)):
            return None
        if not self.reporting.enabled:
            return None
        checkpoint = getattr(self.args, "checkpoint", None)
        if not checkpoint or checkpoint == NOT_SET:
            print("tokenhsi-relay: --eval without --checkpoint: no evaluation results to report", file=sys.stderr)
            return None
        eval_task = getattr(self.args, "eval_task", None) or None
        files = eval_result_files(checkpoint, since=self.started, eval_task=eval_task)
        if not files:
            print("tokenhsi-relay: no evaluation results (metrics_*.json) written since the start in %s: "
                  "nothing reported" % metrics_dir(checkpoint, eval_task), file=sys.stderr)
            return None
        results = {}  # type: Dict[str, Dict[str, Any]]
        for path in files:
            results.update(read_eval_results(path))
        return report_eval(results, self.reporting, self.name, self.config, checkpoint)


def metrics_dir(checkpoint, eval_task=None):
    # type: (str, Optional[str]) -> str
    """Where TokenHSI's players write the evaluation of `checkpoint`: `<dir>/../metrics/<name>`
    (the checkpoint's file name without its `.pth`), and below it `<eval_task>/` for the multi-task
    players run with --eval_task."""
    folder, name = os.path.split(os.path.abspath(checkpoint))
    if name.endswith(".pth"):
        name = name[:-4]
    return os.path.normpath(os.path.join(folder, "..", "metrics", name, eval_task or ""))


def eval_result_files(checkpoint, since, eval_task=None):
    # type: (str, float, Optional[str]) -> List[str]
    """The `metrics_*.json` files of `checkpoint` (and `eval_task`, when given: in its own folder,
    else next to the others) modified at or after `since` (oldest first)."""
    found = []
    folders = [metrics_dir(checkpoint, eval_task)] + ([metrics_dir(checkpoint)] if eval_task else [])
    paths = [path for folder in folders for path in glob.glob(os.path.join(folder, "metrics_*.json"))]
    for path in paths:
        try:
            modified = os.stat(path).st_mtime
        except OSError:
            continue
        if modified >= since - 1.0:  # file systems with coarse timestamps
            found.append((modified, path))
    return [path for _, path in sorted(found)]


def read_eval_results(path):
    # type: (str) -> Dict[str, Dict[str, Any]]
    """{experiment name: {key: number}} from one of TokenHSI's metrics files. Entries that are not
    numbers are left out with a warning; a file that is not such a mapping raises ValueError."""
    try:
        with open(path) as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise ValueError("cannot read the evaluation results in %s: %s" % (path, exc))
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError("%s does not hold {experiment: {metric: number}} results" % path)
    results = {}  # type: Dict[str, Dict[str, Any]]
    for experiment, values in data.items():
        numbers = {}
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                numbers[key] = value
            else:
                log.warning("evaluation result %s/%s in %s is not a number (%r): not reported", experiment, key,
                            path, value)
        results[str(experiment)] = numbers
    return results


def report_eval(results, reporting, name, config, checkpoint, client=None, media=None):
    # type: (Dict[str, Dict[str, Any]], Reporting, Optional[str], Dict[str, Any], str, Any, Optional[Dict[str, Any]]) -> Dict[str, Any]
    """Report {experiment: {key: number}} as `eval/{experiment}/{key}` (one row, and the run's
    summary) in a run `<name>_test` whose config is `config` plus the checkpoint's absolute path;
    `media` (relay.media values, such as a picture of the episodes) go in the same row. Returns what
    `run.finish` returned."""
    from relay.client import RelayClient

    metrics = {}  # type: Dict[str, Any]
    for experiment, values in results.items():
        for key, value in values.items():
            metrics["eval/%s/%s" % (experiment, key)] = value
    owns_client = client is None
    if owns_client:
        client = RelayClient(reporting.relay.get("endpoint"), spill_dir=reporting.relay.get("spill_dir"),
                             keys=reporting.relay.get("keys"))
    w = reporting.wandb
    run_name = "%s_test" % (name or "tokenhsi")
    run_config = dict(config)
    run_config["checkpoint"] = os.path.abspath(checkpoint)
    run = client.start_run(project=w.get("project") or "tokenHSI", name=run_name, entity=w.get("entity"),
                           group=w.get("group"), tags=list(w.get("tags") or []) + ["eval"], notes=w.get("notes"),
                           mode=w.get("mode"), config=run_config, job_type="eval")
    run.log(dict(metrics, **(media or {})))
    run.summary(metrics)
    report = run.finish(exit_code=0, timeout=reporting.finish_timeout)
    if owns_client:
        client.close()
    shown = ", ".join("%s=%s" % (key, _short(value)) for key, value in sorted(metrics.items())
                      if key.endswith("/success_rate"))
    print("tokenhsi-relay: reported %d evaluation metrics of %s to W&B run %s (%s)"
          % (len(metrics), checkpoint, run_name, shown or "no success_rate"))
    return report


def _short(value):
    # type: (Any) -> str
    return "%.4g" % value if isinstance(value, float) and math.isfinite(value) else str(value)
