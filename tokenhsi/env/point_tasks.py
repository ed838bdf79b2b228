"""Small tasks in the spirit of TokenHSI's skills, for a 2-D point-mass character.

Pure torch and vectorised over `num_envs`, on CPU or CUDA; no IsaacGym. Every task exposes
`reset()`, `step(actions) -> (obs, reward, done, info)` and a scripted controller,
`scripted_actions()`, whose motion is the reference ("demonstration") style that an AMP
discriminator learns: smooth, bounded-acceleration moves towards the current target.

- PointTraj: follow a random path (a line with a sideways wave) that moves with time.
- PointCarry: walk to an object, pick it up, bring it to a goal.
- PointMultiTask: half the environments do each; the task id is one-hot in the observation and
  per-task rewards are reported so that they can be logged as `rewards/{task_name}`.

`info["amp_obs"]` is the transition feature (velocity before, velocity after) per environment;
`info["error"]` the distance still to go (to the path point, or from the object to its goal).
"""
from __future__ import annotations

import math

import torch

DT = 0.05
MAX_ACCEL = 4.0
DAMPING = 0.5


class PointMass:
    """Shared dynamics: position and velocity; actions in [-1, 1]^2 are accelerations."""

    name = "point"
    action_dim = 2
    amp_obs_dim = 4
    episode_length = 150

    def __init__(self, num_envs: int, device: str = "cpu", seed: int = 0):
        self.num_envs = num_envs
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.pos = torch.zeros(num_envs, 2, device=self.device)
        self.vel = torch.zeros(num_envs, 2, device=self.device)
        self.progress = torch.zeros(num_envs, dtype=torch.long, device=self.device)
        self.all_envs = torch.arange(num_envs, device=self.device)

    def uniform(self, count: int, dims: int, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(count, dims, generator=self.generator, device=self.device)

    def integrate(self, actions: torch.Tensor) -> torch.Tensor:
        """Advance the character; returns the velocity before the step (for amp_obs)."""
        before = self.vel.clone()
        accel = actions.clamp(-1.0, 1.0) * MAX_ACCEL
        self.vel = self.vel * (1.0 - DAMPING * DT) + accel * DT
        self.pos = self.pos + self.vel * DT
        self.progress += 1
        return before

    def pd_towards(self, target: torch.Tensor, speed: float = 1.5, gain: float = 2.0) -> torch.Tensor:
        """The scripted controller: head for `target` at a comfortable speed, gently."""
        offset = target - self.pos
        distance = offset.norm(dim=1, keepdim=True).clamp_min(1e-6)
        desired = offset / distance * torch.clamp(distance * gain, max=speed)
        return ((desired - self.vel) * 2.0).clamp(-1.0, 1.0)

    def reset(self, env_ids: torch.Tensor | None = None) -> torch.Tensor:
        env_ids = self.all_envs if env_ids is None else env_ids
        self.pos[env_ids] = self.uniform(len(env_ids), 2, -1.0, 1.0)
        self.vel[env_ids] = 0.0
        self.progress[env_ids] = 0
        self.reset_task(env_ids)
        return self.observe()

    def step(self, actions: torch.Tensor):
        before = self.integrate(actions)
        reward, success = self.task_reward()
        timeout = self.progress >= self.episode_length
        done = timeout | self.finished_early(success)
        info = {"amp_obs": torch.cat([before, self.vel], dim=1), "success": success & done,
                "error": self.error(), "terminated": done, "task_rewards": {self.name: reward.mean()}}
        done_ids = done.nonzero(as_tuple=False).flatten()
        if len(done_ids):
            self.reset(done_ids)
        return self.observe(), reward, done, info

    def finished_early(self, success: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(success)

    # subclasses: reset_task, observe, task_reward, scripted_actions, obs_dim


class PointTraj(PointMass):
    name = "traj"
    obs_dim = 2 + 6
    lookahead = (0, 5, 10)

    def __init__(self, num_envs: int, device: str = "cpu", seed: int = 0):
        super().__init__(num_envs, device, seed)
        self.start = torch.zeros(num_envs, 2, device=self.device)
        self.direction = torch.zeros(num_envs, 2, device=self.device)
        self.wave = torch.zeros(num_envs, 2, device=self.device)   # amplitude, angular frequency

    def reset_task(self, env_ids: torch.Tensor) -> None:
        angle = self.uniform(len(env_ids), 1, -math.pi, math.pi)
        self.direction[env_ids] = torch.cat([angle.cos(), angle.sin()], dim=1)
        self.start[env_ids] = self.pos[env_ids]
        self.wave[env_ids] = torch.cat([self.uniform(len(env_ids), 1, 0.0, 0.5),
                                        self.uniform(len(env_ids), 1, 0.5, 2.0)], dim=1)

    def target(self, ahead: int = 0) -> torch.Tensor:
        t = ((self.progress + ahead).float() * DT).unsqueeze(1)
        sideways = torch.stack([-self.direction[:, 1], self.direction[:, 0]], dim=1)
        along = self.start + self.direction * t * 0.8
        return along + sideways * self.wave[:, :1] * torch.sin(self.wave[:, 1:] * t)

    def observe(self) -> torch.Tensor:
        return torch.cat([self.vel] + [self.target(k) - self.pos for k in self.lookahead], dim=1)

    def error(self) -> torch.Tensor:
        return (self.target() - self.pos).norm(dim=1)

    def task_reward(self):
        distance = (self.target() - self.pos).norm(dim=1)
        return torch.exp(-2.0 * distance ** 2), distance < 0.3

    def scripted_actions(self) -> torch.Tensor:
        return self.pd_towards(self.target(4), speed=2.0, gain=6.0)


class PointCarry(PointMass):
    name = "carry"
    obs_dim = 2 + 2 + 2 + 1
    episode_length = 200

    def __init__(self, num_envs: int, device: str = "cpu", seed: int = 0):
        super().__init__(num_envs, device, seed)
        self.object = torch.zeros(num_envs, 2, device=self.device)
        self.goal = torch.zeros(num_envs, 2, device=self.device)
        self.carrying = torch.zeros(num_envs, dtype=torch.bool, device=self.device)

    def reset_task(self, env_ids: torch.Tensor) -> None:
        self.object[env_ids] = self.uniform(len(env_ids), 2, -2.0, 2.0)
        self.goal[env_ids] = self.uniform(len(env_ids), 2, -2.0, 2.0)
        self.carrying[env_ids] = False

    def observe(self) -> torch.Tensor:
        return torch.cat([self.vel, self.object - self.pos, self.goal - self.object,
                          self.carrying.float().unsqueeze(1)], dim=1)

    def task_reward(self):
        self.carrying |= (self.object - self.pos).norm(dim=1) < 0.2
        self.object = torch.where(self.carrying.unsqueeze(1), self.pos, self.object)
        reach = torch.exp(-(self.object - self.pos).norm(dim=1) ** 2)
        deliver = torch.exp(-(self.goal - self.object).norm(dim=1) ** 2)
        reward = torch.where(self.carrying, 0.5 + 0.5 * deliver, 0.5 * reach)
        return reward, self.carrying & ((self.goal - self.object).norm(dim=1) < 0.2)

    def finished_early(self, success: torch.Tensor) -> torch.Tensor:
        return success

    def error(self) -> torch.Tensor:
        return (self.goal - self.object).norm(dim=1)

    def scripted_actions(self) -> torch.Tensor:
        return self.pd_towards(torch.where(self.carrying.unsqueeze(1), self.goal, self.object))


class PointMultiTask:
    """Both tasks side by side; observation = padded task observation + one-hot task id."""

    name = "multitask"
    action_dim = 2
    amp_obs_dim = 4
    task_names = ("traj", "carry")

    def __init__(self, num_envs: int, device: str = "cpu", seed: int = 0):
        half = num_envs // 2
        self.tasks = [PointTraj(half, device, seed), PointCarry(num_envs - half, device, seed + 1)]
        self.num_envs = num_envs
        self.device = torch.device(device)
        self.obs_dim = max(task.obs_dim for task in self.tasks) + len(self.tasks)
        self.task_id = torch.cat([torch.full((task.num_envs,), index, device=self.device)
                                  for index, task in enumerate(self.tasks)])

    def _join(self, observations: list) -> torch.Tensor:
        rows = []
        for index, obs in enumerate(observations):
            padded = torch.zeros(obs.shape[0], self.obs_dim, device=self.device)
            padded[:, :obs.shape[1]] = obs
            padded[:, self.obs_dim - len(self.tasks) + index] = 1.0
            rows.append(padded)
        return torch.cat(rows)

    def reset(self) -> torch.Tensor:
        return self._join([task.reset() for task in self.tasks])

    def step(self, actions: torch.Tensor):
        results, start = [], 0
        for task in self.tasks:
            results.append(task.step(actions[start:start + task.num_envs]))
            start += task.num_envs
        obs = self._join([r[0] for r in results])
        info = {"amp_obs": torch.cat([r[3]["amp_obs"] for r in results]),
                "success": torch.cat([r[3]["success"] for r in results]),
                "error": torch.cat([r[3]["error"] for r in results]),
                "terminated": torch.cat([r[3]["terminated"] for r in results]),
                "task_rewards": {name: r[1].mean() for name, r in zip(self.task_names, results)}}
        return obs, torch.cat([r[1] for r in results]), torch.cat([r[2] for r in results]), info

    def scripted_actions(self) -> torch.Tensor:
        return torch.cat([task.scripted_actions() for task in self.tasks])


TASKS = {"PointTraj": PointTraj, "PointCarry": PointCarry, "PointMultiTask": PointMultiTask}
