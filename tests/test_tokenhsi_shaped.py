"""A TokenHSI-shaped checkout (tests/tokenhsi_shaped) on rl-games 1.1.4, end to end, as a user runs it.

The checkout is copied to tmp, `relay tokenhsi patch` edits its tokenhsi/run.py, and run.py trains
with the rl-games 1.1.4 venv's Python (`rlg114_python`) from the checkout's root, exactly like
TokenHSI's scripts (`python tokenhsi/run.py --task ... --cfg_env tokenhsi/data/cfg/... --cfg_train
...`), reporting through a real relay (`relay serve` subprocess) to the fake W&B server. Then
`--test --eval --checkpoint X` evaluates a checkpoint. What W&B received is compared with what the
agent wrote to its own TensorBoard files (read back with tensorboard's EventAccumulator), with the
checkpoints on disk, and with the evaluation JSON the player wrote.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")
yaml = pytest.importorskip("yaml")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

from harness import ROOT  # noqa: E402

pytestmark = pytest.mark.timeout(300)

SHAPED = os.path.join(ROOT, "tests", "tokenhsi_shaped")
AMP_YAML = "tokenhsi/data/cfg/train/rlg/amp_imitation_task.yaml"
AMP_ENV = "tokenhsi/data/cfg/basic_interaction_skills/amp_humanoid_traj.yaml"
MULTI_YAML = "tokenhsi/data/cfg/train/rlg/amp_imitation_task_transformer_multi_task.yaml"
MULTI_ENV = "tokenhsi/data/cfg/multi_task/amp_humanoid_traj_sit_carry_climb.yaml"
TASKS = ["traj", "sit", "carry", "climb"]
NUM_ENVS = 8
HORIZON = 8                       # the yamls' horizon_length
FRAMES = NUM_ENVS * HORIZON       # frames per epoch
MAX_ITERATIONS = 4                # TokenHSI stops when epoch > max_epochs: epochs 1..5
EPOCHS = MAX_ITERATIONS + 1
SEED = 1
INSERTED = [
    "    from relay.integrations.tokenhsi import TokenHSIRelay  # tokenhsi-relay",
    "    relay_session = TokenHSIRelay(args, cfg, cfg_train)  # tokenhsi-relay",
    "    algo_observer = relay_session.observer(algo_observer)  # tokenhsi-relay",
    "    relay_session.after_run()  # tokenhsi-relay",
]
EVAL_KEYS = ["num_trials", "success_trials", "success_rate", "success_precision", "fail_trials",
             "fail_trials_because_terminate", "fail_trials_total"]
OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


# -- helpers -----------------------------------------------------------------------------------------

def wandb_name(tag: str) -> str:
    """The W&B name each tag TokenHSI's agents and RLGPUAlgoObserver write must arrive under."""
    base, _, axis = tag.rpartition("/")
    if axis in ("frame", "iter", "time", "mean") and base:
        if base == "rewards0":
            return "rewards/mean"
        if re.fullmatch(r"rewards\d+", base):
            return "rewards/%d" % int(base[len("rewards"):])
        if base.startswith("reward_"):
            return "rewards/" + base[len("reward_"):]
        if base in ("episode_lengths", "successes/consecutive_successes"):
            return base + "/mean"
    return tag


def checkout_copy(tmp_path) -> str:
    root = str(tmp_path / "TokenHSI")
    shutil.copytree(SHAPED, root, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    patched = subprocess.run([sys.executable, "-m", "relay", "tokenhsi", "patch", root], capture_output=True,
                             text=True, timeout=60, cwd=ROOT)
    assert patched.returncode == 0, patched.stdout + patched.stderr
    lines = open(os.path.join(root, "tokenhsi", "run.py")).read().splitlines()
    assert [line for line in lines if line.endswith("# tokenhsi-relay")] == INSERTED
    return root


def trainer_env(relay, tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "RELAY_"))}
    env.update({"RELAY_ENDPOINT": relay.endpoint, "RELAY_SPILL_DIR": str(tmp_path / "spill"), "PYTHONPATH": ROOT,
                "PYTHONUNBUFFERED": "1"})
    return env


def run_py(python, root, env, argv) -> subprocess.CompletedProcess:
    result = subprocess.run([python, "tokenhsi/run.py", *argv], cwd=root, env=env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, "run.py %s exited %d:\n%s\n%s" % (
        " ".join(argv), result.returncode, result.stdout[-4000:], result.stderr[-4000:])
    return result


def expected_args(python, root, argv) -> dict:
    """vars(get_args()) for `argv`, from the checkout's own utils.config in the trainer's Python."""
    code = ("import json, sys; sys.path.insert(0, 'tokenhsi'); sys.argv = ['tokenhsi/run.py'] + %r\n"
            "from utils.config import get_args\nprint(json.dumps(vars(get_args())))" % (list(argv),))
    out = subprocess.run([python, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def find_run(fake, name: str):
    fake.wait_for(lambda: any((r.display_name or r.name) == name and r.complete for r in fake.runs().values()), 120)
    runs = [r for r in fake.runs().values() if (r.display_name or r.name) == name]
    assert len(runs) == 1, sorted(r.display_name or r.name for r in fake.runs().values())
    return runs[0]


def strings(value, path=""):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from strings(item, "%s.%s" % (path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from strings(item, "%s[%d]" % (path, index))
    elif isinstance(value, str):
        yield path, value


def tensorboard_rows(experiment_dir: str) -> tuple[list[int], list[dict]]:
    """(frame of each epoch, {W&B name: float32 value} of each epoch) from the agent's tfevents files.
    Every tag is written once per epoch, so a tag's k-th value belongs to epoch k + 1."""
    accumulator = event_accumulator.EventAccumulator(os.path.join(experiment_dir, "summaries"),
                                                     size_guidance={"scalars": 0})
    accumulator.Reload()
    epochs = accumulator.Scalars("info/epochs")
    assert [int(e.value) for e in epochs] == list(range(1, EPOCHS + 1))
    assert [e.step for e in epochs] == [FRAMES * i for i in range(EPOCHS)]
    rows = [{} for _ in range(EPOCHS)]
    for tag in accumulator.Tags()["scalars"]:
        events = accumulator.Scalars(tag)
        assert len(events) == EPOCHS, "%s written %d times in %d epochs" % (tag, len(events), EPOCHS)
        for index, event in enumerate(events):
            name = wandb_name(tag)
            assert rows[index].get(name, event.value) == event.value, (tag, index)
            rows[index][name] = event.value
    return [e.step for e in epochs], rows


def assert_history_matches_tensorboard(run, frames, rows):
    assert [row["epoch"] for row in run.history] == list(range(1, EPOCHS + 1)), run.history
    assert [row["frame"] for row in run.history] == frames
    for epoch, (got, want) in enumerate(zip(run.history, rows), start=1):
        names = {k for k in got if not k.startswith("_")} - {"frame", "epoch"}
        assert names == set(want), "epoch %d: only in W&B %s, only in TensorBoard %s" % (
            epoch, sorted(names - set(want)), sorted(set(want) - names))
        for name, value in want.items():
            assert np.float32(got[name]) == np.float32(value), "epoch %d %s: TensorBoard %r, W&B %r" % (
                epoch, name, value, got[name])


def assert_checkpoints(fake, run, nn_dir, name, frames, stdout):
    """Every save is one artifact version, in save order, with its row's epoch and frame; its bytes
    are the checkpoint of that epoch (the file on disk for the last save of a name, else the same
    weights as that epoch's intermediate file); the console names the final files."""
    saves = []  # (file name, epoch), in TokenHSI's order: every 2nd epoch name + intermediate, the last epoch
    for epoch in range(1, EPOCHS + 1):
        if epoch % 2 == 0:
            saves += [(name + ".pth", epoch), ("%s_%08d.pth" % (name, epoch), epoch)]
        if epoch > MAX_ITERATIONS:
            saves.append((name + ".pth", epoch))
    assert [line for line in stdout.splitlines() if line.startswith("=> saving checkpoint")] == [
        "=> saving checkpoint '%s'" % os.path.join(nn_dir, file) for file, _ in saves]
    assert ".relay-tmp-" not in stdout
    assert sorted(os.listdir(nn_dir)) == sorted({file for file, _ in saves})

    # the run is complete (find_run): W&B's finish waited for its artifacts
    artifacts = sorted((a for a in fake.artifacts() if a.run_id == run.run_id), key=lambda a: a.version)
    assert [(a.type, list(a.files)) for a in artifacts] == [("model", [file]) for file, _ in saves]
    assert [a.metadata for a in artifacts] == [{"epoch": epoch, "frame": frames[epoch - 1]} for _, epoch in saves]
    assert "latest" in artifacts[-1].aliases
    for index, (artifact, (file, epoch)) in enumerate(zip(artifacts, saves)):
        data = artifact.files[file]
        state = torch.load(io.BytesIO(data), map_location="cpu")
        assert (state["epoch"], state["frame"]) == (epoch, frames[epoch - 1] + FRAMES), \
            "%s v%d holds epoch %d's checkpoint, not epoch %d's" % (file, artifact.version, state["epoch"], epoch)
        if all(other != file for other, _ in saves[index + 1:]):  # the last save of this name: the file
            with open(os.path.join(nn_dir, file), "rb") as handle:
                assert hashlib.sha256(data).hexdigest() == hashlib.sha256(handle.read()).hexdigest(), file
        else:
            intermediate = torch.load(os.path.join(nn_dir, "%s_%08d.pth" % (name, epoch)), map_location="cpu")
            assert state["model"].keys() == intermediate["model"].keys()
            assert all(torch.equal(state["model"][k], intermediate["model"][k]) for k in state["model"])


def expected_config(root, train_yaml, env_yaml, args, overrides) -> dict:
    """The training yaml as load_cfg and main() leave it, the env yaml (plus what load_cfg adds)
    under cfg_env, the command line under args."""
    with open(os.path.join(root, train_yaml)) as handle:
        config = yaml.safe_load(handle)
    assert config["params"]["config"]["learning_rate"] == "2e-5", "YAML 1.1 loads 2e-5 as a string"
    settings = config["params"]["config"]
    settings.update({"learning_rate": 2e-05, "eval": bool(args["test"] and args["eval"]), "eval_task": args["eval_task"],
                     "num_actors": NUM_ENVS, "device": "cpu", "seed": SEED, "train_dir": args["output_path"]})
    settings.update(overrides)
    config["params"]["seed"] = SEED
    if args["checkpoint"] != "Base":
        config["params"]["load_path"] = args["checkpoint"]
    with open(os.path.join(root, env_yaml)) as handle:
        cfg_env = yaml.safe_load(handle)
    cfg_env["env"]["numEnvs"] = NUM_ENVS
    if args["checkpoint"] != "Base":
        cfg_env["env"]["checkpoint"] = args["checkpoint"]
    cfg_env.update({"name": args["task"], "headless": True, "task": {"randomize": False}, "seed": SEED})
    config["cfg_env"] = cfg_env
    config["args"] = args
    return config


def assert_plain_config(config):
    bad = [(path, text) for path, text in strings(config) if OBJECT_REPR.search(text) or text.startswith("Namespace(")]
    assert not bad, "object reprs in the W&B config: %s" % bad


def assert_eval_run(fake, name, checkpoint, config, stdout):
    metrics = glob.glob(os.path.join(os.path.dirname(checkpoint), "..", "metrics",
                                     os.path.basename(checkpoint)[:-4], "**", "metrics_*.json"), recursive=True)
    assert len(metrics) == 1, metrics
    with open(metrics[0]) as handle:
        results = json.load(handle)
    assert sorted(results) == ["ObjectSet_test_0", "ObjectSet_test_1", "ObjectSet_test_2"]
    assert all(list(values) == EVAL_KEYS for values in results.values())
    expected = {"eval/%s/%s" % (experiment, key): value
                for experiment, values in results.items() for key, value in values.items()}
    assert "tokenhsi-relay: reported %d evaluation metrics of %s to W&B run %s (" % (
        len(expected), checkpoint, name) in stdout, stdout[-3000:]
    run = find_run(fake, name)
    assert run.exit_code == 0
    # one row; `frame` is the axis every row of a relay run carries (W&B adds the step metric)
    assert [{k: v for k, v in row.items() if not k.startswith("_") and k != "frame"} for row in run.history] == [
        expected]
    assert run.config == dict(config, checkpoint=os.path.abspath(checkpoint))
    assert_plain_config(run.config)
    return results


# -- the tests ---------------------------------------------------------------------------------------

def test_amp_training_and_eval_reach_wandb_as_tokenhsi_wrote_them(rlg114_python, fake_wandb, relay_factory, tmp_path):
    root = checkout_copy(tmp_path)
    output = tmp_path / "output"
    output.mkdir()
    relay = relay_factory(fake_wandb, ["--mode", "online", "--artifact-root", str(output)])
    env = trainer_env(relay, tmp_path)

    # -- train: the run is named after the training yaml's file (no --experiment, no wandb.name)
    argv = ["--task", "HumanoidTraj", "--cfg_env", AMP_ENV, "--cfg_train", AMP_YAML, "--num_envs", str(NUM_ENVS),
            "--seed", str(SEED), "--max_iterations", str(MAX_ITERATIONS), "--headless", "--rl_device", "cpu",
            "--output_path", str(output)]
    trained = run_py(rlg114_python, root, env, argv)
    run = find_run(fake_wandb, "amp_imitation_task")
    assert (run.exit_code, run.project, list(run.tags), run.notes) == (
        0, "tokenHSI", ["amp", "traj"], "shaped checkout, single task")
    experiment_dir, = glob.glob(str(output / "Humanoid_*"))

    frames, rows = tensorboard_rows(experiment_dir)
    expected_names = {
        "performance/total_fps", "performance/step_fps", "performance/update_time", "performance/play_time",
        "info/epochs", "losses/a_loss", "losses/c_loss", "losses/bounds_loss", "losses/entropy", "info/last_lr",
        "info/lr_mul", "info/e_clip", "info/clip_frac", "info/kl", "losses/disc_loss", "info/disc_agent_acc",
        "info/disc_demo_acc", "info/disc_agent_logit", "info/disc_demo_logit", "info/disc_grad_penalty",
        "info/disc_logit_loss", "info/disc_reward_mean", "info/disc_reward_std",
        "successes/consecutive_successes/mean", "rewards/mean", "episode_lengths/mean"}
    assert all(set(row) == expected_names for row in rows), [sorted(set(row) ^ expected_names) for row in rows]
    assert_history_matches_tensorboard(run, frames, rows)
    assert_checkpoints(fake_wandb, run, os.path.join(experiment_dir, "nn"), "Humanoid", frames, trained.stdout)

    train_args = expected_args(rlg114_python, root, argv)
    config = expected_config(root, AMP_YAML, AMP_ENV, train_args, {"max_epochs": MAX_ITERATIONS})
    assert run.config["params"]["config"]["learning_rate"] == 2e-05
    assert isinstance(run.config["params"]["config"]["learning_rate"], float)
    assert isinstance(run.config["params"]["network"], dict)
    assert run.config == config
    assert_plain_config(run.config)

    # -- --test --eval: the player's JSON as eval/{ObjectSet}/{key} in a run <name>_test
    checkpoint = os.path.join(experiment_dir, "nn", "Humanoid.pth")
    argv = ["--task", "HumanoidTraj", "--cfg_env", AMP_ENV, "--cfg_train", AMP_YAML, "--num_envs", str(NUM_ENVS),
            "--seed", str(SEED), "--headless", "--rl_device", "cpu", "--test", "--eval", "--checkpoint", checkpoint,
            "--output_path", str(output)]
    tested = run_py(rlg114_python, root, env, argv)
    eval_config = expected_config(root, AMP_YAML, AMP_ENV, expected_args(rlg114_python, root, argv), {})
    results = assert_eval_run(fake_wandb, "amp_imitation_task_test", checkpoint, eval_config, tested.stdout)
    assert all(values["num_trials"] == NUM_ENVS for values in results.values())


def test_multi_task_training_and_eval_task_reach_wandb(rlg114_python, fake_wandb, relay_factory, tmp_path):
    root = checkout_copy(tmp_path)
    output = tmp_path / "output"
    output.mkdir()
    relay = relay_factory(fake_wandb, ["--mode", "online", "--artifact-root", str(output)])
    env = trainer_env(relay, tmp_path)

    # -- train with --experiment: the run (and TokenHSI's checkpoint) take that name
    argv = ["--task", "HumanoidTrajSitCarryClimb", "--cfg_env", MULTI_ENV, "--cfg_train", MULTI_YAML,
            "--num_envs", str(NUM_ENVS), "--seed", str(SEED), "--max_iterations", str(MAX_ITERATIONS), "--headless",
            "--rl_device", "cpu", "--experiment", "stage1", "--output_path", str(output)]
    trained = run_py(rlg114_python, root, env, argv)
    run = find_run(fake_wandb, "stage1")
    assert (run.exit_code, run.project, list(run.tags), run.group) == (0, "tokenHSI", ["trans", "multi_task"], "stage1")
    experiment_dir, = glob.glob(str(output / "stage1_*"))

    frames, rows = tensorboard_rows(experiment_dir)
    for row in rows:
        assert {"rewards/mean", "losses/compensate_composer_reg_loss", "info/e_clip", "info/disc_logit_loss",
                "successes/consecutive_successes/mean"} | {"rewards/" + task for task in TASKS} <= set(row)
    assert_history_matches_tensorboard(run, frames, rows)
    assert_checkpoints(fake_wandb, run, os.path.join(experiment_dir, "nn"), "stage1", frames, trained.stdout)
    config = expected_config(root, MULTI_YAML, MULTI_ENV, expected_args(rlg114_python, root, argv),
                             {"max_epochs": MAX_ITERATIONS, "name": "stage1"})
    assert run.config == config
    assert_plain_config(run.config)

    # -- --test --eval --eval_task sit (TokenHSI's stage1_eval.sh): the multi-task player writes its JSON
    # under metrics/<checkpoint>/<eval_task>/; wandb.name in the yaml names the run over --experiment
    train_yaml = os.path.join(root, MULTI_YAML)
    with open(train_yaml) as handle:
        text = handle.read()
    with open(train_yaml, "w") as handle:
        handle.write(text.replace("wandb:\n", "wandb:\n  name: tokenhsi_stage1\n", 1))
    checkpoint = os.path.join(experiment_dir, "nn", "stage1.pth")
    argv = ["--task", "HumanoidTrajSitCarryClimb", "--cfg_env", MULTI_ENV, "--cfg_train", MULTI_YAML,
            "--num_envs", str(NUM_ENVS), "--seed", str(SEED), "--headless", "--rl_device", "cpu", "--experiment",
            "stage1", "--test", "--eval", "--eval_task", "sit", "--checkpoint", checkpoint,
            "--output_path", str(output)]
    tested = run_py(rlg114_python, root, env, argv)
    assert glob.glob(os.path.join(experiment_dir, "metrics", "stage1", "sit", "metrics_*.json"))
    eval_config = expected_config(root, MULTI_YAML, MULTI_ENV, expected_args(rlg114_python, root, argv),
                                  {"name": "stage1"})
    eval_config["wandb"] = dict(eval_config["wandb"], name="tokenhsi_stage1")
    assert_eval_run(fake_wandb, "tokenhsi_stage1_test", checkpoint, eval_config, tested.stdout + tested.stderr)


def test_checkpoints_saved_under_one_name_while_wandb_is_away_keep_each_epochs_bytes(
        rlg114_python, fake_wandb, relay_factory, tmp_path):
    """TokenHSI saves every checkpoint to the same nn/<name>.pth. W&B is unreachable for the whole
    training (the relay spools), then comes back: each artifact version must still hold the
    checkpoint of its own epoch, not the file as it is when the upload finally happens."""
    root = checkout_copy(tmp_path)
    output = tmp_path / "output"
    output.mkdir()
    fake_wandb.set_fault("503")
    relay = relay_factory(fake_wandb, ["--mode", "online", "--artifact-root", str(output)])
    argv = ["--task", "HumanoidTraj", "--cfg_env", AMP_ENV, "--cfg_train", AMP_YAML, "--num_envs", str(NUM_ENVS),
            "--seed", str(SEED), "--max_iterations", str(MAX_ITERATIONS), "--headless", "--rl_device", "cpu",
            "--output_path", str(output)]
    trained = run_py(rlg114_python, root, trainer_env(relay, tmp_path), argv)
    assert not fake_wandb.runs(), "W&B was away: nothing can have arrived yet"
    fake_wandb.set_fault("ok")

    run = find_run(fake_wandb, "amp_imitation_task")
    experiment_dir, = glob.glob(str(output / "Humanoid_*"))
    frames, rows = tensorboard_rows(experiment_dir)
    assert_history_matches_tensorboard(run, frames, rows)
    assert_checkpoints(fake_wandb, run, os.path.join(experiment_dir, "nn"), "Humanoid", frames, trained.stdout)
