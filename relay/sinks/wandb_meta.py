"""The trainer node's provenance and system metrics in wandb 0.31's own terms (the W&B sink's helper).

In-process wandb describes the machine that runs it; an uploader runs on the relay's host, so the
sink turns wandb's own collection off there (relay/sinks/wandb.py) and hands wandb-core the
trainer's instead, where in-process wandb puts it:
- `init_settings`: wandb.Settings fields for wandb.init: `host` (the run's host), `program`, and
  `git_commit`/`git_remote_url` (the run's commit and repository). Machine info stays on (so that
  wandb-core sends the host) while stats and wandb-core's own probe of the machine stay off.
- `environment_record`: the EnvironmentRecord wandb-core turns into the run's `wandb-metadata.json`
  (Overview: host, program, args, python, git, GPU, CPU count, memory) and the `e` entry of its
  config, as its own probe of the machine would (wandb-core merges the records it is given).
- `stats_record`: one sample as the StatsRecord wandb-core writes to the run's `wandb-events.jsonl`
  (W&B's system charts, each name under `system.`), stamped with the trainer's time. Stats take
  no history row and no step.
These go through the run's interface (`run._interface`), which wandb 0.31 does not make public:
pinned (pyproject), and covered by tests/test_provenance.py.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

log = logging.getLogger("relay.uploader")  # part of the uploader's log, as operators read it

PROVENANCE_FILE = "relay-provenance.json"   # the whole provenance as the trainer sent it (a run file)
DIFF_FILE = "diff.patch"                    # the trainer checkout's uncommitted changes, as in-process wandb


def init_settings(provenance: dict | None) -> dict[str, Any]:
    """wandb.Settings fields for a run whose trainer sent `provenance` (None: nothing of the
    relay's host either)."""
    if not provenance:
        return {"x_disable_machine_info": True}
    git = provenance.get("git") or {}
    found = {"host": provenance.get("host"), "program": provenance.get("program"),
             "git_commit": git.get("commit"), "git_remote_url": git.get("remote_url")}
    settings = {key: value for key, value in found.items() if value}
    settings.update(x_disable_machine_info=False, x_disable_meta=True)
    return settings


def environment_record(provenance: dict) -> pb.EnvironmentRecord:
    record = pb.EnvironmentRecord()
    for field in ("host", "program", "root", "executable", "python", "os", "username", "gpu_type", "cuda_version"):
        if isinstance(provenance.get(field), str):
            setattr(record, field, provenance[field])
    for field in ("cpu_count", "cpu_count_logical", "gpu_count"):
        if _unsigned(provenance.get(field), 32):
            setattr(record, field, provenance[field])
    record.args.extend(provenance.get("args") or [])
    if _time(provenance.get("started_at")):
        record.started_at.FromNanoseconds(int(provenance["started_at"] * 1e9))
    if _unsigned(provenance.get("memory_total"), 64):
        record.memory.total = provenance["memory_total"]
    git = provenance.get("git") or {}
    if git.get("commit"):
        record.git.commit = git["commit"]
    if git.get("remote_url"):
        record.git.remote_url = git["remote_url"]
    for gpu in provenance.get("gpus") or []:
        entry = record.gpu_nvidia.add()
        entry.name = gpu["name"]
        if _unsigned(gpu.get("memory_total"), 64):
            entry.memory_total = gpu["memory_total"]
    return record


def _unsigned(value: Any, bits: int) -> bool:
    """Can the protobuf field (uint32/uint64) hold `value`? Others are left out."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << bits


def _time(value: Any) -> bool:
    """A time a protobuf Timestamp can hold (years 1..9999): others are left out."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and -62135596800 <= value < 253402300800


def stats_record(values: dict, at: float | None) -> pb.StatsRecord:
    record = pb.StatsRecord(stats_type=pb.StatsRecord.StatsType.SYSTEM)
    if not _time(at):
        record.timestamp.GetCurrentTime()
    else:
        record.timestamp.FromNanoseconds(int(at * 1e9))
    for key, value in values.items():
        item = record.item.add()
        item.key = key
        item.value_json = json.dumps(value)
    return record


def provenance_file(provenance: dict) -> str:
    return json.dumps(provenance, indent=2, sort_keys=True) + "\n"


def set_provenance(run: Any, meta: dict) -> None:
    """A `meta` record into the open wandb `run`: the trainer node's metadata (wandb-metadata.json, the
    config's `e`), and the run files diff.patch (its uncommitted changes) and relay-provenance.json."""
    run._interface.publish_environment(environment_record(meta["provenance"]))  # not public: wandb is pinned
    files = {PROVENANCE_FILE: provenance_file(meta["provenance"])}
    if meta.get("diff"):
        files[DIFF_FILE] = meta["diff"]
    for name, text in files.items():
        path = os.path.join(run.dir, name)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        run.save(path, base_path=run.dir, policy="now")


def trainer_node(sink: Any, kind: str, body: dict) -> None:
    """A `meta` or `system` record into the W&B sink's open run (relay/sinks/wandb.py's WandbSink):
    the trainer node's metadata and files, or one sample of its system metrics (no row, no step).
    What wandb refuses of one is logged and left out: never a reason to stop the run."""
    try:
        (set_provenance if kind == "meta" else log_system)(sink._run, body)
    except (ValueError, TypeError, OverflowError, OSError) as exc:
        log.warning("run %s: the trainer's %s record (seq %s) is left out of W&B: %s", sink.run_id, kind,
                    body.get("seq"), exc)


def log_system(run: Any, system: dict) -> None:
    """A `system` record into the open wandb `run`: one sample on its events stream."""
    interface = run._interface  # not public: wandb is pinned (pyproject)
    interface._publish(interface._make_record(stats=stats_record(system["values"], system.get("time"))))
