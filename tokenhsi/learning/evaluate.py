"""`run.py --test`: play the policy for N episodes and report eval/{exp_name}/... through the relay
(in a run `<name>_test`, exp_name being the run's name), with a picture of the first episodes
(`<output_path>/<name>_eval.png`, logged as the image eval/{exp_name}/episodes)."""
from __future__ import annotations

import os

import torch

from tokenhsi.env.point_tasks import TASKS
from tokenhsi.learning.eval_picture import Traces, draw


def play(player, task, episodes: int, traces: Traces | None = None) -> dict:
    """Run until `episodes` episodes have ended. success_precision: the mean distance still to go
    (to the path point, or object to goal) at the end of the successful trials, lower is better.
    `traces` follows the first episodes for the picture."""
    obs = task.reset()
    successes = trials = 0
    errors = []
    while trials < episodes:
        with torch.no_grad():
            actions = player.get_action(obs, is_deterministic=True)
        if traces is not None:
            traces.before_step(task)
        obs, _, done, info = task.step(actions)
        if traces is not None:
            traces.after_step(done, info["success"])
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
    traces = Traces(num_envs)
    results = play(player, task, args.test_episodes, traces)
    print("evaluation of %s over %d episodes: %s" % (args.checkpoint, results["num_trials"], results))
    picture = draw(traces, os.path.join(os.path.abspath(args.output_path), "%s_eval.png" % name),
                   "%s, %s" % (name, os.path.basename(args.checkpoint)))
    reporting = cfg.reporting()
    if reporting.enabled:
        import relay
        from relay.integrations.tokenhsi import report_eval

        media = {"eval/%s/episodes" % name: relay.Image(picture, caption="paths (green: success, red: failure), "
                                                         "goals in blue")} if picture else {}
        report_eval({name: results}, reporting, name, config, args.checkpoint, media=media)
    return 0
