"""tokenhsi/run.py end to end: the real script as a subprocess, a real relay, the fake W&B server."""
from __future__ import annotations

import glob
import hashlib
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("rl_games")

from harness import ROOT  # noqa: E402

pytestmark = pytest.mark.timeout(300)

TRAINING_NAMES = {
    "performance/total_fps", "performance/step_fps", "performance/update_time", "performance/play_time",
    "losses/a_loss", "losses/c_loss", "losses/disc_loss", "losses/bounds_loss", "losses/entropy",
    "info/epochs", "info/last_lr", "info/lr_mul", "info/kl", "info/clip_frac",
    "info/disc_agent_acc", "info/disc_demo_acc", "info/disc_agent_logit", "info/disc_demo_logit",
    "info/disc_grad_penalty", "info/disc_reward_mean", "info/disc_reward_std",
    "rewards/mean", "rewards/traj", "rewards/carry", "episode_lengths/mean",
}
EVAL_NAMES = {"success_rate", "success_precision", "num_trials", "success_trials", "fail_trials"}


def run_py(relay, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "RELAY_"))}
    env.update({"RELAY_ENDPOINT": relay.endpoint, "PYTHONPATH": ROOT})
    return subprocess.run([sys.executable, os.path.join(ROOT, "tokenhsi", "run.py"), "--task", "PointMultiTask",
                           "--cfg_env", os.path.join(ROOT, "cfg", "env", "point_multitask.yaml"),
                           "--cfg_train", os.path.join(ROOT, "cfg", "train", "amp_point_multitask.yaml"),
                           "--num_envs", "64", "--seed", "1", *args],
                          env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)


def find_run(fake, name: str):
    runs = [run for run in fake.runs().values() if (run.display_name or run.name) == name]
    assert len(runs) == 1, [r.display_name for r in fake.runs().values()]
    return runs[0]


def test_train_then_test_report_every_metric_checkpoint_and_eval_result(fake_wandb, relay_factory, tmp_path):
    output = tmp_path / "output"
    output.mkdir()
    relay = relay_factory(fake_wandb, ["--mode", "online", "--artifact-root", str(output)])
    trained = run_py(relay, "--max_epochs", "7", "--output_path", str(output))
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    fake_wandb.wait_for(lambda: any((r.display_name == "amp_point_multitask" and r.complete)
                                    for r in fake_wandb.runs().values()), 120)
    run = find_run(fake_wandb, "amp_point_multitask")
    assert run.exit_code == 0
    assert [row["epoch"] for row in run.history] == list(range(1, 8))
    assert all("frame" in row for row in run.history)
    logged = set().union(*(set(row) for row in run.history))
    assert TRAINING_NAMES <= logged, "missing: %s" % sorted(TRAINING_NAMES - logged)
    # the W&B config: the training yaml whole, the env yaml, the command line
    config = run.config
    assert (config["params"]["config"]["horizon_length"], config["params"]["config"]["amp"]["disc_reward_w"]) == (32, 0.3)
    assert config["params"]["config"]["learning_rate"] == 3.0e-4 and config["params"]["network"]["mlp"]["units"] == [64, 64]
    assert config["params"]["network"]["space"]["continuous"]["sigma_init"] == {"name": "const_initializer", "val": -1.0}
    assert config["use_wandb"] is True and config["wandb"]["project"] == "tokenHSI"
    assert config["cfg_env"] == {"env": {"task": "PointMultiTask", "num_envs": 256}}
    assert config["args"]["max_epochs"] == 7 and config["args"]["num_envs"] == 64 and config["args"]["test"] is False
    assert " object at 0x" not in repr(config)
    checkpoints = sorted(glob.glob(str(output / "**" / "*.pth"), recursive=True))
    artifacts = fake_wandb.artifacts()
    assert checkpoints and len(artifacts) == len(checkpoints)
    on_disk = {hashlib.sha256(open(path, "rb").read()).hexdigest() for path in checkpoints}
    uploaded = {hashlib.sha256(data).hexdigest() for artifact in artifacts for data in artifact.files.values()}
    assert uploaded == on_disk
    assert all(a.type == "model" for a in artifacts)
    frame_of_epoch = {row["epoch"]: row["frame"] for row in run.history}
    for artifact in artifacts:  # each checkpoint sits on the chart where its epoch's row is
        assert artifact.metadata == {"epoch": artifact.metadata["epoch"], "frame": frame_of_epoch[artifact.metadata["epoch"]]}
    saved = [line for line in trained.stdout.splitlines() if line.startswith("=> saving checkpoint")]
    assert saved and not [line for line in saved if ".relay-tmp-" in line], saved
    assert {line.split("'")[1] for line in saved} == set(checkpoints)

    tested = run_py(relay, "--test", "--checkpoint", checkpoints[-1], "--test_episodes", "64",
                    "--output_path", str(output))
    assert tested.returncode == 0, tested.stdout[-3000:] + tested.stderr[-3000:]
    fake_wandb.wait_for(lambda: any((r.display_name == "amp_point_multitask_test" and r.complete)
                                    for r in fake_wandb.runs().values()), 120)
    evaluation = find_run(fake_wandb, "amp_point_multitask_test")
    names = {"eval/amp_point_multitask/%s" % name for name in EVAL_NAMES}
    assert names <= set(evaluation.history[0])
    row = evaluation.history[0]
    assert evaluation.config["checkpoint"] == checkpoints[-1] and evaluation.config["args"]["test"] is True
    assert row["eval/amp_point_multitask/num_trials"] == (row["eval/amp_point_multitask/success_trials"]
                                                           + row["eval/amp_point_multitask/fail_trials"]) >= 64
    # the picture of the episodes: a PNG in the output dir, uploaded as an image of that row
    picture = (output / "amp_point_multitask_eval.png").read_bytes()
    image = row["eval/amp_point_multitask/episodes"]
    assert (image["_type"], image["format"], picture[:8]) == ("image-file", "png", b"\x89PNG\r\n\x1a\n")
    assert hashlib.sha256(evaluation.files[image["path"]]).hexdigest() == hashlib.sha256(picture).hexdigest()
    assert [name for name in evaluation.files if name.endswith(".png")] == [image["path"]]


def test_bad_training_config_names_the_key(tmp_path):
    bad = tmp_path / "amp_bad.yaml"
    bad.write_text(open(os.path.join(ROOT, "cfg", "train", "amp_point_traj.yaml")).read()
                   .replace("use_wandb: True", "use_wandb: True\nuse_wandbb: True"))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tokenhsi", "run.py"), "--task", "PointTraj",
                             "--cfg_env", os.path.join(ROOT, "cfg", "env", "point_traj.yaml"), "--cfg_train", str(bad)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2 and "unknown top-level key(s) ['use_wandbb']" in result.stderr


def test_reporting_block_under_params_is_an_error_naming_where_it_belongs(tmp_path):
    bad = tmp_path / "amp_misplaced.yaml"
    bad.write_text(open(os.path.join(ROOT, "cfg", "train", "amp_point_traj.yaml")).read()
                   .replace("  config:\n", "  config:\n    use_wandb: True\n", 1))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tokenhsi", "run.py"), "--task", "PointTraj",
                             "--cfg_env", os.path.join(ROOT, "cfg", "env", "point_traj.yaml"), "--cfg_train", str(bad)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr == ("error: %s: params.config.use_wandb is misplaced: `use_wandb` belongs at the top level "
                             "of the training yaml, next to `params:` (move it there)\n" % bad)


def test_isaacgym_task_points_to_the_checkout_integration_without_importing_isaacgym(tmp_path):
    probe = tmp_path / "isaacgym.py"   # importing it would leave a mark
    probe.write_text("open(%r, 'w').write('imported')\n" % str(tmp_path / "imported"))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tokenhsi", "run.py"), "--task", "HumanoidTraj",
                             "--cfg_env", os.path.join(ROOT, "cfg", "env", "point_traj.yaml"),
                             "--cfg_train", os.path.join(ROOT, "cfg", "train", "amp_point_traj.yaml")],
                            capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: --task HumanoidTraj is not a built-in task "
                                    "(PointTraj, PointCarry, PointMultiTask).")
    assert '"Use with an existing TokenHSI checkout"' in result.stderr
    assert not (tmp_path / "imported").exists(), "run.py imported isaacgym"
