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
    (exit code 1, the exception propagates); an `atexit` hook finishes a run whose training never
    returned through the wrapper (exit code 1 if training was never started).
  * wraps `algo.update_epoch`, which rl_games' and TokenHSI's training loops call first thing in
    every epoch: there the previous epoch's buffered scalars are sent as ONE row,
    `run.log(row, frame=frame, epoch=epoch)`, with `frame` and `epoch` as rl_games gave them to
    `after_print_stats(frame, epoch_num, total_time)`. The row leaves when its epoch ends, not after
    the next epoch's rollout.
- `after_steps()` (once per epoch, after the rollout): for an agent without `update_epoch`, the
  previous epoch's row is sent here instead.
- `process_infos`, `after_clear_stats`: only look whether a row's device-to-host copy has finished.

With `WANDB_MODE=disabled` (or `mode="disabled"`), on ranks other than 0, or after `finish`, every
hook returns at once: no writer, `save` or `train` is wrapped, no client is made.

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

Rows: everything written between two `update_epoch` calls (without one, two `after_steps` calls) is
one row. For agents that call neither (rl_games' SAC), a row ends when a tag written since the last
`after_print_stats` is written again. Every row is also sent before a checkpoint is reported and when training ends;
the relay merges rows logged with the same `frame`.

Values: Python numbers (and numpy scalars) pass through. Torch tensors are never `.item()`-ed one
by one: at the end of a row, the row's 1-element tensors are stacked per device
(`torch.stack([v.detach().reshape(()).double() ...])`, float32 off CPU/CUDA) and copied to the host
in ONE transfer; from CUDA the copy goes non-blocking into pinned memory and a CUDA event is
recorded. The row is logged when the event has fired (looked at, without waiting, at every
`process_infos`/`after_steps`), and at the latest at the next row, checkpoint or end of training
(so at most one sync per row, normally none). Tensors with more than one element are not sent.
Float64 is used so that int and float64 tensors keep their value (the brief said `.float()`).

Checkpoints: the wrapped `algo.save(fn, ...)` calls the agent's own `save` with a temporary name in
the same directory (`.<name>.relay-tmp-<pid>-<hex>`), so `torch_ext.save_checkpoint` writes
`<tmp>.pth`; each file the save produced (`<tmp>` + suffix, normally `.pth`) is fsynced and
`os.replace`d onto `fn` + suffix, the directory is fsynced, the current row is sent, and each
final file is reported with `run.log_checkpoint(path, metadata={"epoch": algo.epoch_num,
"frame": algo.frame}, aliases=["latest"])` (the epoch and frame stored in the checkpoint). A reader
therefore never sees a half-written `fn.pth`, and the relay never uploads one. If the save raises,
the temporary files are removed and the exception propagates. A process killed inside `save` can
leave a `.<name>.relay-tmp-*` file behind; the previous `fn.pth` is untouched.

This module imports nothing outside the standard library at import time (torch is looked up only
when a row holds tensors; rl_games' `AlgoObserver` is used when rl_games imports) and must stay
importable on Python 3.8 (IsaacGym environments).
"""
from __future__ import annotations

import atexit
import functools
import logging
import math
import os
import re
import sys
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple  # noqa: F401 (Tuple: in type comments)

from relay.tensors import Transfer, Waiting, batch_to_python, start_transfer  # noqa: F401 (part of this module's API)

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


# -- the writer --------------------------------------------------------------------------------------

def _noop(*args: Any, **kwargs: Any) -> None:
    return None


class RelayWriter(object):
    """Stands in for the agent's SummaryWriter: every call reaches the original writer unchanged;
    scalars are also handed to the observer's row buffer."""

    def __init__(self, writer: Any, record: Callable[[str, Any], None]):
        self.__dict__["_relay_writer"] = writer
        self.__dict__["_relay_record"] = record

    @property
    def original(self) -> Any:
        return self.__dict__["_relay_writer"]

    def add_scalar(self, tag, scalar_value, global_step=None, *args, **kwargs):
        writer = self.__dict__["_relay_writer"]
        result = None
        if writer is not None:
            result = writer.add_scalar(tag, scalar_value, global_step, *args, **kwargs)
        self.__dict__["_relay_record"](tag, scalar_value)
        return result

    def add_scalars(self, main_tag, tag_scalar_dict, global_step=None, *args, **kwargs):
        writer = self.__dict__["_relay_writer"]
        result = None
        if writer is not None:
            result = writer.add_scalars(main_tag, tag_scalar_dict, global_step, *args, **kwargs)
        record = self.__dict__["_relay_record"]
        for key, value in dict(tag_scalar_dict).items():
            record("%s/%s" % (main_tag, key), value)
        return result

    def __getattr__(self, name):
        writer = self.__dict__.get("_relay_writer")
        if writer is None:
            if name.startswith("__"):
                raise AttributeError(name)
            return _noop  # flush(), close(), add_histogram(), ... on a relay-only writer
        return getattr(writer, name)

    def __setattr__(self, name, value):
        writer = self.__dict__.get("_relay_writer")
        if writer is None:
            self.__dict__[name] = value
        else:
            setattr(writer, name, value)


# -- the observer ------------------------------------------------------------------------------------

class RelayAlgoObserver(AlgoObserver):
    """An rl_games algo observer that reports the agent's scalars and checkpoints through the relay."""

    def __init__(self, client: Any = None, project: str = "tokenHSI", name: Optional[str] = None,
                 entity: Optional[str] = None, group: Optional[str] = None, tags: Optional[List[str]] = None,
                 notes: Optional[str] = None, mode: Optional[str] = None, run_id: Optional[str] = None,
                 endpoint: Optional[str] = None, finish_timeout: float = 10.0, spill_dir: Optional[str] = None,
                 keys: Optional[str] = None, config: Optional[Dict[str, Any]] = None):
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
        self.run = None            # the relay Run while reporting, else None
        self.report = None         # what run.finish() returned
        self.algo = None
        self.writer = None         # the RelayWriter installed on the agent
        self._config = None        # type: Optional[Dict[str, Any]]
        self._experiment_name = None  # type: Optional[str]
        self._row = {}             # type: Dict[str, Any]   (W&B name -> value, this row)
        self._tags = set()         # raw tags written since the epoch's stamp (a repeat = a new epoch)
        self._stamp = None         # type: Optional[Tuple[int, int]]  (frame, epoch) from after_print_stats
        self._fallback = None      # type: Optional[Tuple[Optional[int], Optional[int]]]
        self._logged = None        # type: Optional[Tuple[Optional[int], Optional[int]]]  (frame, epoch) of the last row
        self._waiting = Waiting()  # the rows whose copy to the host is under way: (frame, epoch)
        self._seen_after_steps = False
        self._epoch_hook = False   # True once `algo.update_epoch` is wrapped: rows end where epochs end
        self._train_started = False
        self._names = {}           # type: Dict[str, str]  (tag -> name cache)
        self._warned = set()       # type: set

    # -- rl_games hooks --------------------------------------------------------------------------

    def before_init(self, base_name, config, experiment_name):
        self._config = config
        self._experiment_name = experiment_name

    def after_init(self, algo):
        if self.run is not None or self.report is not None:
            return
        if self.mode == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
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
                                    config=sanitize_config(config), mode=self.mode, run_id=self.run_id)
        if getattr(run, "client", None) is None:  # DisabledRun (WANDB_MODE=disabled seen by the client)
            return
        self.run = run
        self.algo = algo
        self._wrap_writer(algo)
        self._wrap_save(algo)
        self._wrap_train(algo)
        self._wrap_update_epoch(algo)
        atexit.register(self._at_exit)

    def process_infos(self, infos, done_indices):
        if self._waiting:
            self._poll()

    def after_steps(self):
        if self.run is None:
            return
        if self._epoch_hook:  # the row already ended with its epoch
            if self._waiting:
                self._poll()
            return
        self._end_row()

    def _end_row(self) -> None:
        """An epoch ended: send its row (logged once its device copy has landed)."""
        self._seen_after_steps = True
        if self._row:
            self._flush()
        elif self._waiting:
            self._poll()
        self._stamp = None
        self._tags.clear()

    def after_clear_stats(self):
        if self._waiting:
            self._poll()

    def after_print_stats(self, frame, epoch_num, total_time):
        if self.run is None:
            return
        stamp = (int(frame), int(epoch_num))
        if self._stamp is not None and stamp != self._stamp:
            if self._row:
                self._flush()  # an agent that skipped after_steps: the old epoch's row ends here
            self._tags.clear()
        self._stamp = stamp

    # -- the end -----------------------------------------------------------------------------------

    def finish(self, exit_code: int = 0) -> Optional[Dict[str, Any]]:
        """Send what is buffered and finish the W&B run (done for you when training returns)."""
        run = self.run
        if run is None:
            return self.report
        try:
            self._flush(wait=True)
        except Exception as exc:  # never lose the finish over a bad last row
            log.warning("relay: could not send the last row: %s", exc)
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

    def _wrap_writer(self, algo) -> None:
        original = getattr(algo, "writer", None)
        self.writer = RelayWriter(original, self._record)
        algo.writer = self.writer
        if original is None:
            return
        for holder in list(vars(algo).values()):  # e.g. central_value_net.writter, self_play_manager.writter
            attrs = getattr(holder, "__dict__", None)
            if holder is algo or holder is original or not isinstance(attrs, dict):
                continue
            for attr in ("writter", "writer"):
                if attrs.get(attr) is original:
                    try:
                        setattr(holder, attr, self.writer)
                    except Exception:
                        pass

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
            except BaseException:
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
                    observer._end_row()
                except Exception as exc:  # the relay must never break training
                    observer._warn_once("epoch", "relay: could not send a row: %s" % exc)
            return original(*args, **kwargs)

        algo.update_epoch = update_epoch
        self._epoch_hook = True

    # -- rows --------------------------------------------------------------------------------------

    def _record(self, tag: str, value: Any) -> None:
        if self.run is None:
            return
        try:
            name = self._names.get(tag)
            if name is None:
                name = self._names[tag] = map_tag(str(tag))
            if tag in self._tags:
                if self._stamp is not None or not self._seen_after_steps:
                    if self._row:
                        self._flush()  # the same tag again after the epoch's stats: a new epoch
                    self._stamp = None
                    self._tags.clear()
            self._tags.add(tag)
            if not self._row and self._stamp is None:
                algo = self.algo
                self._fallback = (getattr(algo, "frame", None), getattr(algo, "epoch_num", None))
            self._row[name] = value
        except Exception as exc:  # the relay must never break training
            self._warn_once("record", "relay: could not record %r: %s" % (tag, exc))

    def _flush(self, wait: bool = False) -> None:
        """Send the buffered row (its copy to the host started now; logged when it is done). The
        row before it is logged first, waited for if need be: at most one row is under way."""
        self._complete(wait=True)
        if self._row:
            row, self._row = self._row, {}
            frame, epoch = self._stamp if self._stamp is not None else (self._fallback or (None, None))
            self._logged = (_as_int(frame), _as_int(epoch))
            transfer = start_transfer(row)
            if transfer.skipped:
                self._warn_once("skipped:" + ",".join(transfer.skipped),
                                "relay: not sent (not a single number): %s" % ", ".join(transfer.skipped))
            self._waiting.add((_as_int(frame), _as_int(epoch)), transfer)
            if not transfer.events or wait:
                self._complete(wait=True)

    def _poll(self) -> None:
        self._complete(wait=False)

    def _complete(self, wait: bool) -> None:
        """Log the rows whose copy has landed (`wait`: all of them, waiting for the copies)."""
        try:
            for (frame, epoch), values in self._waiting.landed(wait):
                run = self.run
                if run is None:
                    continue
                try:
                    run.log(values, frame=frame, epoch=epoch)
                except Exception as exc:
                    self._warn_once("log", "relay: could not send a row: %s" % exc)
        except Exception as exc:  # the copy itself failed
            self._warn_once("poll", "relay: a row was lost: %s" % exc)

    # -- checkpoints -------------------------------------------------------------------------------

    def _save(self, original: Callable[..., Any], fn: Any, *args: Any, **kwargs: Any) -> Any:
        target = os.fspath(fn)
        directory, base = os.path.split(target)
        tmp_base = ".%s.relay-tmp-%d-%s" % (base[:80], os.getpid(), uuid.uuid4().hex[:8])
        tmp = os.path.join(directory, tmp_base)
        started = time.time()
        stdout = sys.stdout
        sys.stdout = _Renaming(stdout, tmp, target)  # "=> saving checkpoint '<target>.pth'" on the console
        try:
            result = original(tmp, *args, **kwargs)
        except BaseException:
            for name in _produced(directory, tmp_base):
                try:
                    os.unlink(os.path.join(directory, name))
                except OSError:
                    pass
            raise
        finally:
            if isinstance(sys.stdout, _Renaming) and sys.stdout.stream is stdout:
                sys.stdout = stdout
        produced = _produced(directory, tmp_base)
        finals = []
        for name in produced:
            source = os.path.join(directory, name)
            final = target + name[len(tmp_base):]
            _fsync_path(source)
            os.replace(source, final)
            finals.append(final)
        if finals:
            _fsync_path(directory or ".")
        else:  # a save that ignored the name it was given: report what it wrote, if we can tell
            finals = [p for p in (target + ".pth", target)
                      if os.path.isfile(p) and os.path.getmtime(p) >= started - 1.0][:1]
        if self.run is not None:
            try:
                self._flush(wait=True)  # the epoch's row before its checkpoint
                metadata = {key: value for key, value in zip(("frame", "epoch"), self._checkpoint_stamp())
                            if value is not None}
                for final in finals:
                    self.run.log_checkpoint(os.path.abspath(final), metadata=metadata, aliases=["latest"])
            except Exception as exc:
                self._warn_once("checkpoint", "relay: could not report checkpoint %s: %s" % (target, exc))
        return result

    def _checkpoint_stamp(self):
        # type: () -> Tuple[Optional[int], Optional[int]]
        """(frame, epoch) for a checkpoint: those of this epoch's row, so that the checkpoint sits on
        the chart where its row does (TokenHSI's agents add the epoch's frames to `algo.frame`
        before they save); the agent's own counters when no row was logged yet."""
        if self._stamp is not None:
            return _as_int(self._stamp[0]), _as_int(self._stamp[1])
        if self._logged is not None:
            return self._logged
        algo = self.algo
        return _as_int(getattr(algo, "frame", None)), _as_int(getattr(algo, "epoch_num", None))

    def _warn_once(self, key: str, text: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(text)


class _Renaming(object):
    """A text stream that writes to `stream` with `old` replaced by `new` (the temporary checkpoint
    name by the final one, while the agent's own save prints what it writes)."""

    def __init__(self, stream, old, new):
        # type: (Any, str, str) -> None
        self.stream = stream
        self._old = old
        self._new = new

    def write(self, text):
        # type: (str) -> int
        if isinstance(text, str):
            text = text.replace(self._old, self._new)
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _produced(directory: str, prefix: str) -> List[str]:
    try:
        return sorted(name for name in os.listdir(directory or ".") if name.startswith(prefix))
    except OSError:
        return []


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _as_int(value: Any) -> Optional[int]:
    if value is None:
        return None
    try:
        number = float(value) if not isinstance(value, int) else value
        if isinstance(number, float) and not math.isfinite(number):
            return None
        return int(number)
    except (TypeError, ValueError):
        return None


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


# TokenHSI's training yaml -> an observer (kept here too: the README's hand edit imports it from here).
from relay.integrations.tokenhsi import observer_from_train_config  # noqa: E402,F401
