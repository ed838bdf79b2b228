"""Shared pieces of the benchmarks: a relay subprocess, RSS readings, a row of 40 metrics.

Not a test helper: the benchmarks import it by path (`bench/` is put on sys.path by each script).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from relay.testing import RelayProcess, free_endpoint  # noqa: E402

__all__ = ["ROOT", "Relay", "available_mib", "bench_env", "codes", "cpu_seconds", "descendants", "free_endpoint",
           "known_variables", "metrics_row", "percentile", "pss_kib", "ready_wait", "rss_kib", "run_workers"]


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def metrics_row(rng: random.Random, count: int = 40) -> dict:
    return {"group%d/metric%02d" % (i % 4, i): rng.random() for i in range(count)}


def bench_env(extra: dict | None = None, code: str = ROOT) -> dict:
    """The environment for a relay (and its uploaders) under benchmark: no W&B account, quiet.
    `code`: the directory whose `relay` package runs (another checkout, for before/after)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "RELAY_"))}
    env.update({"WANDB_SILENT": "true", "PYTHONPATH": code})
    env.update(extra or {})
    return env


def codes(parser: argparse.ArgumentParser, compare: str | None) -> list[tuple[str, str]]:
    """The code trees a benchmark runs its relay cases with: ("this", ROOT), then ("compare", DIR)
    for `--compare DIR` (a usage error when DIR holds no relay package)."""
    if compare is None:
        return [("this", ROOT)]
    if not os.path.isdir(os.path.join(compare, "relay")):
        parser.error("--compare %s: no relay package there (make one with e.g. `git archive REV | tar -x -C DIR`)"
                     % compare)
    return [("this", ROOT), ("compare", os.path.abspath(compare))]


def known_variables(env: dict, code: str) -> tuple[dict, list[str]]:
    """`env` without the RELAY_ settings that `code`'s relay does not have (an older relay refuses
    a variable it does not know), and the names left out."""
    listing = ("import json; from relay.config import CLIENT_VARIABLES, RelayConfig; "
               "print(json.dumps(sorted(CLIENT_VARIABLES) + ['RELAY_' + k.upper() for k in RelayConfig.model_fields]))")
    known = set(json.loads(subprocess.run([sys.executable, "-c", listing], env=bench_env(code=code), cwd=code,
                                          capture_output=True, text=True, check=True).stdout))
    dropped = sorted(name for name in env if name.startswith("RELAY_") and name not in known)
    return {k: v for k, v in env.items() if k not in dropped}, dropped


def rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB (0 when it is gone)."""
    try:
        with open("/proc/%d/status" % pid) as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def pss_kib(pid: int) -> int:
    """Proportional set size in KiB: shared pages (the uploaders share what their fork server
    imported) counted once across processes, where a sum of RSS would count them in each."""
    try:
        with open("/proc/%d/smaps_rollup" % pid) as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used so far, user + system (0 when it is gone)."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def available_mib() -> int:
    """MemAvailable of this machine, in MiB."""
    with open("/proc/meminfo") as handle:
        return next(int(line.split()[1]) // 1024 for line in handle if line.startswith("MemAvailable:"))


def descendants(pid: int) -> list[int]:
    """Every process below `pid`: the relay's uploader fork server, its uploaders, their wandb-core."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            parents.setdefault(parent, []).append(int(entry))
    found, todo = [], list(parents.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(parents.get(child, []))
    return found


class Relay(RelayProcess):
    """`relay serve --mode MODE` as a subprocess on a free TCP port, for one measurement (started
    at once; `wait_ready()` waits until it answers)."""

    log_level = "WARNING"

    def __init__(self, spool_dir: str, mode: str = "offline", env: dict | None = None, args: list[str] = (),
                 log_path: str | None = None, code: str = ROOT):
        super().__init__(free_endpoint(), spool_dir, ["--mode", mode, *args], env=env or bench_env(code=code),
                         log_path=log_path, cwd=code)
        self.start(wait=False)

    def stop(self, timeout: float = 120.0) -> int:
        """SIGTERM, and the exit code (a relay still running after `timeout` is killed)."""
        return super().stop(timeout=timeout, must_exit=False)


def ready_wait() -> None:
    """In a worker process: say we are ready, wait for the go (so that all workers start together)."""
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()


def run_workers(script: str, kind: str, jobs: list[dict], env: dict | None = None,
                on_go: Callable[[], None] | None = None) -> list[dict]:
    """Start `script --worker KIND JOB` once per job, wait until every one is ready, let them all go
    at once (then call `on_go`), and return each one's last stdout line (JSON)."""
    procs = [subprocess.Popen([sys.executable, script, "--worker", kind, json.dumps(job)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env or bench_env(), cwd=ROOT)
             for job in jobs]
    try:
        for proc in procs:
            if not proc.stdout.readline():
                raise RuntimeError("a %s worker died before it was ready (exit %s)" % (kind, proc.wait()))
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        if on_go is not None:
            on_go()
        results = []
        for proc in procs:
            out, _ = proc.communicate(timeout=900)
            if proc.returncode != 0:
                raise RuntimeError("a %s worker failed with exit code %d" % (kind, proc.returncode))
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
