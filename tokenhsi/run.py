"""Train or evaluate a TokenHSI-style policy with rl_games, reporting everything through the relay.

    python tokenhsi/run.py --task PointTraj --cfg_env cfg/env/point_traj.yaml \\
        --cfg_train cfg/train/amp_point_traj.yaml [--num_envs N] [--headless] [--test]
        [--checkpoint PATH] [--output_path DIR] [--max_epochs N] [--seed S] [--experiment NAME]

Built-in tasks: PointTraj, PointCarry, PointMultiTask (tokenhsi/env/point_tasks.py). With
`use_wandb: True` metrics, checkpoints and evaluation results go to W&B through the relay
(RELAY_ENDPOINT); `WANDB_MODE=disabled` or `use_wandb: False` turns that off.

IsaacGym tasks (HumanoidTraj, ...) train with a TokenHSI checkout's own run.py, its agents and its
task configs; the relay plugs into that run.py with two lines (README, "Use with an existing
TokenHSI checkout"). Nothing here imports isaacgym.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tokenhsi import config as train_config  # noqa: E402

BUILT_IN_TASKS = ("PointTraj", "PointCarry", "PointMultiTask")
EXTERNAL_TASK = """error: --task %s is not a built-in task (%s).
IsaacGym tasks such as HumanoidTraj train with your TokenHSI checkout's own tokenhsi/run.py, agents
and configs. Report them through the relay by adding two lines to that run.py: see the README
section "Use with an existing TokenHSI checkout"."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="TokenHSI training through tokenhsi-relay")
    parser.add_argument("--task", required=True, help="PointTraj | PointCarry | PointMultiTask")
    parser.add_argument("--cfg_env", required=True)
    parser.add_argument("--cfg_train", required=True)
    parser.add_argument("--num_envs", type=int)
    parser.add_argument("--headless", action="store_true", help="accepted for TokenHSI compatibility")
    parser.add_argument("--test", action="store_true", help="evaluate --checkpoint instead of training")
    parser.add_argument("--test_episodes", type=int, default=256)
    parser.add_argument("--checkpoint", help="a .pth to resume training from, or to evaluate")
    parser.add_argument("--output_path", default="output")
    parser.add_argument("--experiment", help="the W&B run's name (default: the training yaml's file name)")
    parser.add_argument("--max_epochs", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N")
    return parser.parse_args(argv)


def run_name(cfg: train_config.TrainConfig, args: argparse.Namespace) -> str:
    """`wandb.name`, else --experiment, else the training yaml's file name without .yaml."""
    return cfg.wandb.name or args.experiment or cfg.name


def wandb_config(cfg: train_config.TrainConfig, args: argparse.Namespace) -> dict:
    """The W&B config: the training yaml whole, the env yaml under `cfg_env`, the command line under `args`."""
    from relay.integrations.tokenhsi import training_config

    return training_config(cfg.train_yaml, cfg.env_yaml, args)


def make_observer(cfg: train_config.TrainConfig, args: argparse.Namespace):
    from rl_games.common.algo_observer import DefaultAlgoObserver

    reporting = cfg.reporting()
    if not reporting.enabled:
        return DefaultAlgoObserver()
    return reporting.observer(run_name(cfg, args), wandb_config(cfg, args))


def rl_games_params(cfg: train_config.TrainConfig, args: argparse.Namespace) -> dict:
    params = copy.deepcopy(cfg.params)
    settings = params["config"]
    settings["num_actors"] = args.num_envs or cfg.env.num_envs
    settings["env_config"] = {"task": args.task, "device": args.device,
                              "seed": args.seed if args.seed is not None else params.get("seed", 0)}
    settings["player"] = {"use_vecenv": True}  # --test builds the same vectorised task
    settings["device"] = settings["ppo_device"] = settings["device_name"] = args.device
    settings["train_dir"] = args.output_path
    settings["full_experiment_name"] = cfg.name
    if args.max_epochs is not None:
        settings["max_epochs"] = args.max_epochs
    if args.seed is not None:
        params["seed"] = args.seed
    return {"params": params}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = train_config.load(args.cfg_train, args.cfg_env)
    except train_config.ConfigError as exc:
        print("error: %s" % exc, file=sys.stderr)
        return 2
    if args.task not in BUILT_IN_TASKS:
        print(EXTERNAL_TASK % (args.task, ", ".join(BUILT_IN_TASKS)), file=sys.stderr)
        return 2
    from rl_games.algos_torch.players import PpoPlayerContinuous
    from rl_games.torch_runner import Runner

    from tokenhsi.env import vecenv
    from tokenhsi.learning.amp_agent import AMPAgent

    vecenv.register()
    observer = make_observer(cfg, args)
    runner = Runner(algo_observer=observer)
    runner.algo_factory.register_builder("amp_continuous", lambda **kwargs: AMPAgent(**kwargs))
    runner.player_factory.register_builder("amp_continuous", lambda **kwargs: PpoPlayerContinuous(**kwargs))
    runner.load(rl_games_params(cfg, args))
    runner.reset()
    if args.test:
        from tokenhsi.learning.evaluate import evaluate

        return evaluate(runner, cfg, args, run_name(cfg, args), wandb_config(cfg, args))
    runner.run({"train": True, "play": False, "checkpoint": args.checkpoint, "sigma": None})
    return 0


if __name__ == "__main__":
    sys.exit(main())
