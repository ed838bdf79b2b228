"""`run.py --test`: play the policy for N episodes and report eval/{exp_name}/... through the relay
(in a run `<name>_test`, exp_name being the run's name)."""
from __future__ import annotations

import torch

from tokenhsi.env.point_tasks import TASKS


def play(player, task, episodes: int) -> dict:
    """Run until `episodes` episodes have ended. success_precision: the mean distance still to go
    (to the path point, or object to goal) at the end of the successful trials, lower is better."""
    obs = task.reset()
    successes = trials = 0
    errors = []
    while trials < episodes:
        with torch.no_grad():
            actions = player.get_action(obs, is_deterministic=True)
        obs, _, done, info = task.step(actions)
        ended = int(done.sum())
        successes += int(info["success"].sum())
        errors.append(info["error"][info["success"]])
        trials += ended
    errors = torch.cat(errors)
    return {"success_rate": successes / trials, "num_trials": trials, "success_trials": successes,
            "fail_trials": trials - successes,
            "success_precision": float(errors.mean()) if len(errors) else float("nan")}


def evaluate(runner, cfg, args, name: str, config: dict) -> int:
    """Play --test_episodes episodes of --checkpoint; report the results as eval/{name}/{key} in a
    W&B run `<name>_test` whose config is `config` plus the checkpoint's path."""
    if not args.checkpoint:
        print("error: --test needs --checkpoint PATH (a .pth written by training)")
        return 2
    player = runner.create_player()
    player.restore(args.checkpoint)
    player.has_batch_dimension = True
    num_envs = min(args.num_envs or cfg.env.num_envs, args.test_episodes)
    task = TASKS[args.task](num_envs, device=args.device, seed=(args.seed or 0) + 1000)
    results = play(player, task, args.test_episodes)
    print("evaluation of %s over %d episodes: %s" % (args.checkpoint, results["num_trials"], results))
    reporting = cfg.reporting()
    if reporting.enabled:
        from relay.integrations.tokenhsi import report_eval

        report_eval({name: results}, reporting, name, config, args.checkpoint)
    return 0
