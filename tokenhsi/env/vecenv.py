"""The point tasks as an rl_games vectorised environment (`vecenv_type: POINT`)."""
from __future__ import annotations

import torch
from rl_games.common import env_configurations, vecenv
from rl_games.common.gym_compat import spaces
from rl_games.common.ivecenv import IVecEnv

from tokenhsi.env.point_tasks import TASKS

ENV_NAME = "tokenhsi_point"


class PointVecEnv(IVecEnv):
    def __init__(self, config_name: str, num_actors: int, task: str = "PointTraj", device: str = "cpu",
                 seed: int = 0, **unused):
        self.task = TASKS[task](num_actors, device=device, seed=int(seed))
        self.num_actors = num_actors

    def step(self, actions: torch.Tensor):
        obs, reward, done, info = self.task.step(actions)
        return obs, reward, done, info

    def reset(self) -> torch.Tensor:
        return self.task.reset()

    def get_number_of_agents(self) -> int:
        return 1

    def get_env_info(self) -> dict:
        high = float("inf")
        return {"observation_space": spaces.Box(-high, high, (self.task.obs_dim,)),
                "action_space": spaces.Box(-1.0, 1.0, (self.task.action_dim,)), "agents": 1, "value_size": 1}


def register() -> None:
    """Make `env_name: tokenhsi_point` available to rl_games (idempotent)."""
    vecenv.register("POINT", lambda config_name, num_actors, **kwargs: PointVecEnv(config_name, num_actors, **kwargs))
    env_configurations.register(ENV_NAME, {"vecenv_type": "POINT", "env_creator": lambda **kwargs: None})
