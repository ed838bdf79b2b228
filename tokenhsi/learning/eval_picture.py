"""A picture of `run.py --test`: a few episodes' paths, their goals and outcomes, as a PNG.

`Traces` follows a few environments for one episode each while the evaluation plays
(their positions and goals before every step, and whether the episode succeeded); `draw` saves them
with matplotlib, imported only then: without it, one line says so and there is no picture.
"""
from __future__ import annotations

import os
import sys

import torch

SHOWN = 8  # episodes drawn


def _points(task) -> tuple:
    """(positions, goals) of every environment of a point task, [num_envs, 2] each."""
    if hasattr(task, "tasks"):  # PointMultiTask: its tasks side by side
        parts = [_points(inner) for inner in task.tasks]
        return torch.cat([p for p, _ in parts]), torch.cat([g for _, g in parts])
    goal = task.target() if hasattr(task, "target") else task.goal
    return task.pos, goal


class Traces:
    """The paths, goals and outcomes of the first episodes of `shown` environments spread over all
    of them (so a multi-task evaluation shows each task)."""

    def __init__(self, num_envs: int, shown: int = SHOWN):
        self.shown = min(shown, num_envs)
        self.envs = torch.tensor([index * num_envs // self.shown for index in range(self.shown)])
        self.paths = [[] for _ in range(self.shown)]
        self.goals = [[] for _ in range(self.shown)]
        self.outcomes = [None] * self.shown   # True: success, False: failure, None: under way

    def before_step(self, task) -> None:
        if all(outcome is not None for outcome in self.outcomes):
            return
        positions, goals = (t[self.envs.to(t.device)].detach().cpu().tolist() for t in _points(task))
        for env in range(self.shown):
            if self.outcomes[env] is None:
                self.paths[env].append(positions[env])
                self.goals[env].append(goals[env])

    def after_step(self, done, success) -> None:
        envs = self.envs.to(done.device)
        done, success = done[envs].cpu().tolist(), success[envs].cpu().tolist()
        for env in range(self.shown):
            if self.outcomes[env] is None and done[env]:
                self.outcomes[env] = bool(success[env])


def draw(traces: Traces, path: str, title: str):
    """Save the traces as a PNG at `path`; returns `path`, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("tokenhsi-relay: matplotlib is not installed: no picture of the evaluation (pip install matplotlib)",
              file=sys.stderr)
        return None
    figure, axes = plt.subplots(figsize=(6, 6), dpi=80)
    for env, (points, goals, outcome) in enumerate(zip(traces.paths, traces.goals, traces.outcomes)):
        if not points:
            continue
        color = {True: "tab:green", False: "tab:red", None: "tab:gray"}[outcome]
        xs, ys = zip(*points)
        axes.plot(xs, ys, color=color, linewidth=1.5, label=None)
        axes.plot(xs[0], ys[0], "o", color=color, markersize=4)
        gx, gy = zip(*goals)
        axes.plot(gx, gy, ":", color="tab:blue", linewidth=1)
        axes.plot(gx[-1], gy[-1], "x", color="tab:blue", markersize=7)
    done = [outcome for outcome in traces.outcomes if outcome is not None]
    axes.set_title("%s\n%d of %d episodes succeeded" % (title, sum(done), len(done)), fontsize=9)
    axes.set_aspect("equal", adjustable="datalim")
    axes.grid(True, alpha=0.3)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temp = path + ".tmp.png"
    figure.savefig(temp, format="png")
    plt.close(figure)
    os.replace(temp, path)
    return path
