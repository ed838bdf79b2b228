"""The trainer node's provenance and system metrics, as in-process wandb shows them: a trainer under
another host name (a UTS namespace), a real relay, the real wandb SDK, the fake W&B."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time

import pytest

from harness import TESTS
from relay import provenance, sysmetrics
from relay.client import RelayClient

pytestmark = pytest.mark.timeout(180)

TRAINER_HOST = "trainer-node-7"
REMOTE = "https://github.com/example/tokenhsi-fork.git"


def git(repo, *args) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.invalid", GIT_CONFIG_NOSYSTEM="1", HOME=str(repo))
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout


def checkout(path) -> tuple[str, str]:
    """A repository with one commit (its ref packed), a remote, and an uncommitted change: (commit, diff)."""
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    (path / "train.py").write_text("lr = 1e-4\n")
    git(path, "add", "train.py")
    git(path, "commit", "-q", "-m", "first")
    git(path, "remote", "add", "origin", REMOTE)
    git(path, "pack-refs", "--all")  # HEAD's branch now lives in packed-refs only
    (path / "train.py").write_text("lr = 2e-5  # changed, not committed\n")
    return git(path, "rev-parse", "HEAD").strip(), git(path, "diff", "HEAD")


def under_host(name: str) -> list[str]:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a UTS namespace")
    return ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', name]


def test_proc_parsing_on_fixed_text():
    meminfo = "MemTotal:       16318504 kB\nMemFree:         1201032 kB\nMemAvailable:    8159252 kB\n"
    status = "Name:\tpython\nVmPeak:\t 2000 kB\nVmRSS:\t  524288 kB\nThreads:\t7\n"
    stat = "4242 (py thon (x)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1500 250 3 4 20 0 7 0 100 0 0\n"
    assert sysmetrics.parse_meminfo(meminfo) == {"total": 16318504 * 1024, "available": 8159252 * 1024}
    assert sysmetrics.parse_status(status) == {"rss": 524288 * 1024, "threads": 7}
    assert sysmetrics.parse_cpu_ticks(stat) == 1750
    values = sysmetrics.memory_values(sysmetrics.parse_meminfo(meminfo), sysmetrics.parse_status(status))
    assert values == {"memory_percent": 100.0 * (16318504 - 8159252) / 16318504,
                      "proc.memory.availableMB": 8159252 / 1024, "proc.memory.rssMB": 512.0,
                      "proc.memory.percent": 100.0 * 524288 / 16318504, "proc.cpu.threads": 7.0}
    assert sysmetrics.parse_meminfo("") == {} and sysmetrics.memory_values({}, {}) == {}


def test_git_worktree_and_no_repository(tmp_path):
    commit, _ = checkout(tmp_path / "repo")
    git(tmp_path / "repo", "worktree", "add", "-q", "-b", "side", str(tmp_path / "wt"))
    info, diff = provenance.git_provenance(str(tmp_path / "wt"))
    assert (info["commit"], info["remote_url"], info["root"], info["dirty"], diff) == (
        commit, REMOTE, str(tmp_path / "wt"), False, None)
    (tmp_path / "plain").mkdir()
    assert provenance.git_provenance(str(tmp_path / "plain")) == ({}, None)


def test_provenance_and_system_metrics_of_the_trainer_node(fake_wandb, relay_factory, trainer_factory, tmp_path):
    commit, diff = checkout(tmp_path / "repo")
    relay = relay_factory(fake_wandb, ["--mode", "online"])
    args = {"endpoint": relay.endpoint, "run_id": "prov1", "steps": 20, "metrics": 4, "seed": 5,
            "provenance": True, "system_metrics": 0.5, "linger": 3.0}
    trainer = trainer_factory(args, prefix=under_host(TRAINER_HOST), cwd=str(tmp_path / "repo"))
    done = trainer.event("finished")
    assert done["report"]["delivered"] is True
    fake_wandb.wait_for(lambda: fake_wandb.complete("prov1"), 120)
    run = fake_wandb.run("prov1")
    assert os.uname().nodename != TRAINER_HOST
    program = os.path.join(TESTS, "trainer.py")
    assert (run.host, run.program, run.commit, run.repo) == (TRAINER_HOST, program, commit, REMOTE)
    meta = json.loads(run.files["wandb-metadata.json"])
    assert (meta["host"], meta["program"], meta["args"], meta["root"]) == (
        TRAINER_HOST, program, [json.dumps(args)], str(tmp_path / "repo"))
    assert meta["git"] == {"commit": commit, "remote": REMOTE}
    assert meta["cpu_count_logical"] == os.cpu_count() and int(meta["memory"]["total"]) > 0
    assert run.files["diff.patch"] == diff.encode()
    sent = json.loads(run.files["relay-provenance.json"])
    assert sent["git"] == {"commit": commit, "remote_url": REMOTE, "root": str(tmp_path / "repo"), "dirty": True,
                           "diff_bytes": len(diff.encode())}
    assert (sent["host"], sent["root"]) == (TRAINER_HOST, str(tmp_path / "repo"))
    # System metrics: on the events stream (no history row, no step), every 0.5 s for ~3 s.
    assert len(run.history) == 20
    samples = [event for event in run.events if event]
    assert 3 <= len(samples) <= 8, samples
    total_mb = meta and int(meta["memory"]["total"]) / 2 ** 20
    for sample in samples:
        assert 0 <= sample["system.cpu"] <= 100
        assert 0 < sample["system.proc.memory.rssMB"] <= total_mb
        assert 0 < sample["system.memory_percent"] < 100 and sample["system.proc.cpu.threads"] >= 1
    assert relay.stop() == 0


def test_no_git_absent_fields_and_off_switches(fake_wandb, relay_factory, trainer_factory, tmp_path):
    relay = relay_factory(fake_wandb, ["--mode", "online"])
    (tmp_path / "plain").mkdir()
    for run_id, switch in (("nogit", True), ("off", False)):
        trainer = trainer_factory({"endpoint": relay.endpoint, "run_id": run_id, "steps": 5, "metrics": 4, "seed": 6,
                                   "provenance": switch, "system_metrics": 0}, cwd=str(tmp_path / "plain"))
        assert trainer.event("finished")["report"]["delivered"] is True
        fake_wandb.wait_for(lambda: fake_wandb.complete(run_id), 120)
    nogit, off = fake_wandb.run("nogit"), fake_wandb.run("off")
    meta = json.loads(nogit.files["wandb-metadata.json"])
    assert "git" not in meta and nogit.commit is None and nogit.repo is None and "diff.patch" not in nogit.files
    assert nogit.host == meta["host"] == os.uname().nodename and not nogit.events
    # Off: nothing of the trainer's, and nothing of the relay host's either (wandb's program placeholder).
    assert (off.host, off.program, off.commit, off.events) == (None, "<python with no main file>", None, [])
    assert "wandb-metadata.json" not in off.files and "relay-provenance.json" not in off.files
    assert relay.stop() == 0


class StandInNvml:
    """pynvml's calls as nvidia-ml-py answers them for one GPU (no GPU here: the names and units are checked)."""
    NVML_TEMPERATURE_GPU = 0

    class Rates:
        gpu, memory = 87, 41

    class Memory:
        total, used = 80 * 2 ** 30, 20 * 2 ** 30

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("gpu", index)

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA H200"

    def nvmlDeviceGetUtilizationRates(self, handle):
        return self.Rates()

    def nvmlDeviceGetMemoryInfo(self, handle):
        return self.Memory()

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return 61

    def nvmlDeviceGetPowerUsage(self, handle):
        return 350500   # mW

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        return 700000


def test_nvml_readings_under_wandb_names(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", StandInNvml())
    assert provenance.nvml_gpus() == [{"name": "NVIDIA H200", "memory_total": 80 * 2 ** 30}]
    assert sysmetrics.NvmlReader().sample() == {
        "gpu.0.gpu": 87.0, "gpu.0.memory": 41.0, "gpu.0.memoryAllocated": 25.0,
        "gpu.0.memoryAllocatedBytes": float(20 * 2 ** 30), "gpu.0.temp": 61.0, "gpu.0.powerWatts": 350.5,
        "gpu.0.enforcedPowerLimitWatts": 700.0, "gpu.0.powerPercent": 50.07142857142857}


def spooled_kinds(relay, run_ids) -> dict[str, list[str]]:
    """run -> the kinds of its records in the relay's spool, in arrival order."""
    conn = sqlite3.connect("file:%s?mode=ro" % os.path.join(relay.spool_dir, "spool.sqlite"), uri=True)
    try:
        rows = conn.execute("SELECT run_id, kind FROM records ORDER BY id").fetchall()
    finally:
        conn.close()
    kinds = {run_id: [] for run_id in run_ids}
    for run_id, kind in rows:
        kinds.setdefault(run_id, []).append(kind)
    return kinds


def test_runs_finished_beside_sampling_ones_spill_nothing_and_sample_nothing_after_finish(
        fake_wandb, relay_factory, tmp_path):
    """One client, 16 runs sampled every 20 ms, finished one after the other while the others go on
    sampling: a sample another run hands over as a finish's wait for its acks ends is sent, not
    spilled by that finish; the spool holds every record the client took, no sample of a run after
    its finish."""
    fake_wandb.set_fault("503")  # W&B refuses: the relay keeps every record in its spool
    relay = relay_factory(fake_wandb, ["--mode", "online"])
    spill_dir = tmp_path / "spill"
    client = RelayClient(relay.endpoint, spill_dir=str(spill_dir), heartbeat_every=0, provenance=False,
                         system_metrics=0.02)
    run_ids = ["sampled-%02d" % i for i in range(16)]
    runs = [client.start_run(project="late", run_id=run_id) for run_id in run_ids]
    for run in runs:
        run.log({"x": 1.0}, frame=0)
    flush = client.flush

    def flush_then_sample(timeout: float) -> bool:
        """The moment a wait for acks ends, the next open run's sampler hands over a sample (as one
        blocked on the client's lock meanwhile does, now and then)."""
        done = flush(timeout)
        sampling = [run for run in runs if not run._threads.stopped]
        if sampling:
            values = sysmetrics.ProcReader().sample()
            assert sampling[0]._threads.submit({"t": "system", "run": sampling[0].id, "values": values,
                                                "time": time.time()})
        return done

    client.flush = flush_then_sample
    deadline = time.monotonic() + 20
    while not all("system" in kinds for kinds in spooled_kinds(relay, run_ids).values()):  # every sampler runs
        assert client.flush(10) and time.monotonic() < deadline, spooled_kinds(relay, run_ids)
    reports = [run.finish(exit_code=0, timeout=10) for run in runs]
    stats = client.statistics()
    assert client.close() is None
    assert [(r["run"], r["delivered"], r["spill_file"]) for r in reports] == [(i, True, None) for i in run_ids]
    assert (stats["spilled"], stats["pending"], stats["spill_files"], stats["errors"]) == (0, 0, [], 0)
    assert not spill_dir.exists() or os.listdir(spill_dir) == []
    kinds = spooled_kinds(relay, run_ids)
    assert sorted(kinds) == run_ids
    for run_id in run_ids:
        # The run's sampler starts with it: a sample may come before the run's one row.
        assert kinds[run_id][0] == "open" and kinds[run_id][-1] == "finish", (run_id, kinds[run_id])
        middle = kinds[run_id][1:-1]
        assert middle.count("log") == 1 and set(middle) == {"log", "system"}, (run_id, kinds[run_id])
    assert sum(len(found) for found in kinds.values()) == stats["acked"] == stats["sent"]
