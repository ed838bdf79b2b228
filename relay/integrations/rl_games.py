"""rl_games integration: `RelayAlgoObserver` sends what any rl_games agent writes to the relay.

    from rl_games.torch_runner import Runner
    from relay.rl_games import RelayAlgoObserver

    runner = Runner(algo_observer=RelayAlgoObserver(project="tokenHSI", group="ablation"))
    runner.load(yaml_config)
    runner.run({"train": True, "play": False})

How it hooks in (rl_games calls the observer; nothing in rl_games or the agent is edited):

- `before_init(base_name, config, experiment_name)`: keeps the training config (`params['config']`).
- `after_init(algo)` (end of the agent's `__init__`, rank 0 only): opens the W&B run with that config
  (values msgpack cannot carry, such as the observer or the network builder, become `str`; the
  run's name defaults to rl_games' experiment name), then
  * replaces `algo.writer` with a `RelayWriter` that calls the original TensorBoard writer exactly as
    before and also buffers the scalar for the relay (objects that captured the writer earlier, such
    as the central value net's `writter`, are re-pointed too); with no writer (None) it only relays;
  * wraps `algo.save` so that checkpoints are written atomically and then reported;
  * wraps `algo.train` so that the run is finished when training returns (exit code 0) or raises
    (exit code 1, the exception propagates, its traceback in the run's Logs); an `atexit` hook
    finishes a run whose training never returned through the wrapper (exit code 1 if training was
    never started).
  * sends the process's stdout and stderr to the run's Logs until the run finishes (`console=True`,
    the default; relay.console says what is captured and its limits).
  * wraps `algo.update_epoch`, which rl_games' and TokenHSI's training loops call first thing in
    every epoch: there the previous epoch's buffered scalars are sent as ONE row,
    `run.log(row, frame=frame, epoch=epoch)`, with `frame` and `epoch` as rl_games gave them to
    `after_print_stats(frame, epoch_num, total_time)`. The row leaves when its epoch ends, not after
    the next epoch's rollout.
- `after_steps()` (once per epoch, after the rollout): for an agent without `update_epoch`, the
  previous epoch's row is sent here instead.
- `process_infos`, `after_clear_stats`: only look whether a row's device-to-host copy has finished.
- `histograms_every=N` (off: 0): every N epochs the epoch's row also holds `histograms/actions`
  and `histograms/rewards`, histograms of the agent's `experience_buffer.tensor_dict['actions']`
  and `['rewards']` (the epoch's rollout), binned on their device and copied in one transfer.

With `WANDB_MODE=disabled` (or `mode="disabled"`), on ranks other than 0, or after `finish`, every
hook returns at once: no writer, `save` or `train` is wrapped, no client is made.

The parts: relay.integrations.rl_games_tags (TensorBoard tags -> W&B names, the config),
rl_games_writer (the RelayWriter), rl_games_rows (rows and their device values),
rl_games_checkpoints (atomic saves). `relay.rl_games` re-exports the public names of all of them.

This module imports nothing outside the standard library at import time (torch is looked up only
when a row holds tensors; rl_games' `AlgoObserver` is used when rl_games imports) and must stay
importable on Python 3.8 (IsaacGym environments).
"""
from __future__ import annotations

import atexit
import functools
import logging
import os
from typing import Any, Callable, Dict, List, Optional

from relay.histogram import bin_many
from relay.integrations.rl_games_checkpoints import atomic_save
from relay.integrations.rl_games_rows import Rows
from relay.integrations.rl_games_tags import sanitize_config
from relay.integrations.rl_games_writer import install_writer
from relay.media import Histogram
from relay.modes import reporting_disabled

try:  # rl_games (and so torch) present: be a real AlgoObserver
    from rl_games.common.algo_observer import AlgoObserver
except Exception:  # pragma: no cover - rl_games absent or broken: same hooks, no base class needed
    class AlgoObserver(object):  # type: ignore[no-redef]
        def before_init(self, base_name, config, experiment_name):
            pass

        def after_init(self, algo):
            pass

        def process_infos(self, infos, done_indices):
            pass

        def after_steps(self):
            pass

        def after_print_stats(self, frame, epoch_num, total_time):
            pass

log = logging.getLogger("relay.rl_games")

HISTOGRAM_BUFFERS = ("actions", "rewards")  # the experience buffer's tensors histogrammed (histograms_every)


class RelayAlgoObserver(AlgoObserver):
    """An rl_games algo observer that reports the agent's scalars and checkpoints through the relay."""

    def __init__(self, client: Any = None, project: str = "tokenHSI", name: Optional[str] = None,
                 entity: Optional[str] = None, group: Optional[str] = None, tags: Optional[List[str]] = None,
                 notes: Optional[str] = None, mode: Optional[str] = None, run_id: Optional[str] = None,
                 endpoint: Optional[str] = None, finish_timeout: float = 10.0, spill_dir: Optional[str] = None,
                 keys: Optional[str] = None, config: Optional[Dict[str, Any]] = None, histograms_every: int = 0,
                 console: Any = True, provenance: Optional[bool] = None, system_metrics: Optional[float] = None):
        self.client = client
        self._owns_client = False
        self.project = project
        self.name = name
        self.entity = entity
        self.group = group
        self.tags = list(tags) if tags else None
        self.notes = notes
        self.mode = mode
        self.run_id = run_id
        self.endpoint = endpoint
        self.keys = keys           # CurveZMQ client key directory; None: $RELAY_CLIENT_KEYS, else no Curve
        self.finish_timeout = finish_timeout
        self.spill_dir = spill_dir
        self.config = config       # the W&B config; None: rl_games' params['config'] from before_init
        self.console = console     # the process's stdout/stderr to the run's Logs (True, False, ConsoleLimits)
        self.provenance = provenance          # the trainer node's provenance; None: the client's default (on)
        self.system_metrics = system_metrics  # seconds between system samples, 0 none; None: the client's (15)
        self.run = None            # the relay Run while reporting, else None
        self.report = None         # what run.finish() returned
        self.algo = None
        self.writer = None         # the RelayWriter installed on the agent
        self._config = None        # type: Optional[Dict[str, Any]]
        self._experiment_name = None  # type: Optional[str]
        if isinstance(histograms_every, bool) or not isinstance(histograms_every, int) or histograms_every < 0:
            raise ValueError("histograms_every must be an int >= 0 (0: no histograms), got %r" % (histograms_every,))
        self.histograms_every = histograms_every  # every N epochs: histograms of the rollout's actions, rewards
        self.rows = Rows(self._send, lambda: (getattr(self.algo, "frame", None), getattr(self.algo, "epoch_num", None)),
                         self._warn_once, (lambda epoch: epoch_histograms(self.algo, histograms_every, epoch,
                                                                          self._warn_once)) if histograms_every else None)
        self._epoch_hook = False   # True once `algo.update_epoch` is wrapped: rows end where epochs end
        self._train_started = False
        self._warned = set()       # type: set

    # -- rl_games hooks --------------------------------------------------------------------------

    def before_init(self, base_name, config, experiment_name):
        self._config = config
        self._experiment_name = experiment_name

    def after_init(self, algo):
        if self.run is not None or self.report is not None:
            return
        if reporting_disabled(self.mode):
            return  # reporting off: nothing wrapped, every hook returns at once
        rank = getattr(algo, "global_rank", None)
        if rank is None:
            rank = getattr(algo, "rank", 0)
        if rank not in (0, None):
            return  # one W&B run per training: rank 0 reports
        if self.client is None:
            from relay.client import RelayClient
            self.client = RelayClient(self.endpoint, spill_dir=self.spill_dir, keys=self.keys)
            self._owns_client = True
        config = self.config
        if config is None:
            config = self._config if self._config is not None else getattr(algo, "config", {})
        run = self.client.start_run(project=self.project, name=self.name or self._experiment_name,
                                    entity=self.entity, group=self.group, tags=self.tags, notes=self.notes,
                                    config=sanitize_config(config), mode=self.mode, run_id=self.run_id,
                                    console=self.console, provenance=self.provenance,
                                    system_metrics=self.system_metrics)
        if getattr(run, "client", None) is None:  # DisabledRun (reporting disabled, as the client saw it)
            return
        self.run = run
        self.algo = algo
        self.writer = install_writer(algo, self.rows.record)
        self._wrap_save(algo)
        self._wrap_train(algo)
        self._wrap_update_epoch(algo)
        atexit.register(self._at_exit)

    def process_infos(self, infos, done_indices):
        self.rows.poll()

    def after_steps(self):
        if self.run is None:
            return
        if self._epoch_hook:  # the row already ended with its epoch
            self.rows.poll()
        else:
            self.rows.end_row()

    def after_clear_stats(self):
        self.rows.poll()

    def after_print_stats(self, frame, epoch_num, total_time):
        if self.run is not None:
            self.rows.print_stats(frame, epoch_num)

    # -- the end -----------------------------------------------------------------------------------

    def finish(self, exit_code: int = 0) -> Optional[Dict[str, Any]]:
        """Send what is buffered and finish the W&B run (done for you when training returns)."""
        run = self.run
        if run is None:
            return self.report
        try:
            self.rows.flush(wait=True)
        except Exception as exc:  # never lose the finish over a bad last row
            log.warning("relay: could not send the last row: %s", exc)
        self.rows.closed = True  # the agent's writer goes on writing: nothing more is recorded
        self.run = None
        try:
            atexit.unregister(self._at_exit)
        except Exception:  # pragma: no cover
            pass
        self.report = run.finish(exit_code=exit_code, timeout=self.finish_timeout)
        if self._owns_client:
            self.client.close()
        return self.report

    def _at_exit(self) -> None:
        if self.run is not None:
            self.finish(exit_code=0 if self._train_started else 1)

    # -- wrapping ----------------------------------------------------------------------------------

    def _wrap_save(self, algo) -> None:
        original = getattr(algo, "save", None)
        if original is None:
            return
        observer = self

        @functools.wraps(original)
        def save(fn, *args, **kwargs):
            return observer._save(original, fn, *args, **kwargs)

        algo.save = save

    def _wrap_train(self, algo) -> None:
        original = getattr(algo, "train", None)
        if original is None:
            return
        observer = self

        @functools.wraps(original)
        def train(*args, **kwargs):
            observer._train_started = True
            try:
                result = original(*args, **kwargs)
            except SystemExit as exc:
                observer.finish(exit_code=0 if exc.code in (None, 0) else 1)
                raise
            except BaseException as exc:
                capture = getattr(observer.run, "_console", None)  # the Run's console capture, if it has one
                if capture is not None:  # the traceback into the Logs: the interpreter prints it after the finish
                    capture.exception(exc)
                observer.finish(exit_code=1)
                raise
            observer.finish(exit_code=0)
            return result

        algo.train = train

    def _wrap_update_epoch(self, algo) -> None:
        """rl_games' and TokenHSI's training loops call `update_epoch()` first thing in each epoch:
        the previous epoch's row is complete there, and is sent at once (not after the next rollout)."""
        original = getattr(algo, "update_epoch", None)
        if original is None:
            return
        observer = self

        @functools.wraps(original)
        def update_epoch(*args, **kwargs):
            if observer.run is not None:
                try:
                    observer.rows.end_row()
                except Exception as exc:  # the relay must never break training
                    observer._warn_once("epoch", "relay: could not send a row: %s" % exc)
            return original(*args, **kwargs)

        algo.update_epoch = update_epoch
        self._epoch_hook = True

    # -- what the rows and saves hand back ---------------------------------------------------------

    def _send(self, values: Dict[str, Any], frame: Optional[int], epoch: Optional[int]) -> None:
        run = self.run
        if run is not None:
            run.log(values, frame=frame, epoch=epoch)

    def _save(self, original: Callable[..., Any], fn: Any, *args: Any, **kwargs: Any) -> Any:
        """The wrapped `algo.save`: an atomic save (rl_games_checkpoints), then the epoch's row and
        the checkpoint reported."""
        result, finals = atomic_save(original, fn, *args, **kwargs)
        if self.run is not None:
            try:
                self.rows.flush(wait=True)  # the epoch's row before its checkpoint
                metadata = {key: value for key, value in zip(("frame", "epoch"), self.rows.checkpoint_stamp())
                            if value is not None}
                for final in finals:
                    self.run.log_checkpoint(os.path.abspath(final), metadata=metadata, aliases=["latest"])
            except Exception as exc:
                self._warn_once("checkpoint", "relay: could not report checkpoint %s: %s" % (os.fspath(fn), exc))
        return result

    def _warn_once(self, key: str, text: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(text)


def epoch_histograms(algo: Any, every: int, epoch: Optional[int], warn_once: Callable[[str, str], None]) -> Dict[str, Any]:
    """Every `every` epochs, for the epoch's row: histograms of the actions and rewards in the agent's
    experience buffer (the epoch's rollout), binned where they are and copied to the host together
    (relay.histogram.bin_many)."""
    if not epoch or epoch % every:
        return {}
    buffers = getattr(getattr(algo, "experience_buffer", None), "tensor_dict", None) or {}
    named = {"histograms/" + key: buffers[key] for key in HISTOGRAM_BUFFERS if buffers.get(key) is not None}
    if not named:
        warn_once("histograms", "relay: histograms_every is set, but the agent has no experience_buffer with %s: "
                  "no histograms" % " or ".join(HISTOGRAM_BUFFERS))
        return {}
    return {name: Histogram.of_bins(*binned) for name, binned in bin_many(named).items()}


class MultiObserver(AlgoObserver):
    """Forward every rl_games observer hook to several observers, in order. Put RelayAlgoObserver
    first: observers that keep `algo.writer` at `after_init` (TokenHSI's RLGPUAlgoObserver) then
    keep the relay's writer, so what they write is reported too."""

    def __init__(self, *observers):
        self.observers = list(observers)

    def _each(self, hook, *args):
        for observer in self.observers:
            method = getattr(observer, hook, None)
            if method is not None:
                method(*args)

    def before_init(self, base_name, config, experiment_name):
        self._each("before_init", base_name, config, experiment_name)

    def after_init(self, algo):
        self._each("after_init", algo)

    def process_infos(self, infos, done_indices):
        self._each("process_infos", infos, done_indices)

    def after_steps(self):
        self._each("after_steps")

    def after_clear_stats(self):
        self._each("after_clear_stats")

    def after_print_stats(self, frame, epoch_num, total_time):
        self._each("after_print_stats", frame, epoch_num, total_time)
