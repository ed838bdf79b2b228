"""`run.py --test`: play the policy for N episodes and report eval/{exp_name}/... through the relay."""
from __future__ import annotations

import os

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


def evaluate(runner, cfg, args) -> int:
    if not args.checkpoint:
        print("error: --test needs --checkpoint PATH (a .pth written by training)")
        return 2
    player = runner.create_player()
    player.restore(args.checkpoint)
    player.has_batch_dimension = True
    num_envs = min(args.num_envs or cfg.env.num_envs, args.test_episodes)
    task = TASKS[args.task](num_envs, device=args.device, seed=(args.seed or 0) + 1000)
    results = play(player, task, args.test_episodes)
    exp_name = cfg.name
    metrics = {"eval/%s/%s" % (exp_name, key): value for key, value in results.items()}
    print("evaluation of %s over %d episodes: %s" % (args.checkpoint, results["num_trials"], results))
    if cfg.use_wandb and os.environ.get("WANDB_MODE") != "disabled":
        from relay.client import RelayClient

        w = cfg.wandb
        client = RelayClient(cfg.relay.endpoint, spill_dir=cfg.relay.spill_dir)
        run = client.start_run(project=w.project, name=(w.name or exp_name) + "_test", entity=w.entity,
                               group=w.group, tags=list(w.tags) + ["eval"], notes=w.notes, mode=w.mode,
                               config={"checkpoint": os.path.abspath(args.checkpoint), "task": args.task,
                                       "episodes": results["num_trials"]}, job_type="eval")
        run.log(metrics)
        run.summary(metrics)
        run.finish(exit_code=0, timeout=cfg.relay.finish_timeout)
        client.close()
    return 0
