import torch

from env.tasks.humanoid_amp import HumanoidAMP


class HumanoidTrajSitCarryClimb(HumanoidAMP):
    """Several tasks: env i does task i % len(tasks); a one-hot task code ends the observation, and
    `extras[task]` masks the envs doing that task (what the agent's per-task reward meters read)."""

    def __init__(self, cfg, **kwargs):
        self._multiple_task_names = list(cfg["env"]["multiTask"])
        super().__init__(cfg, **kwargs)
        self._task_index = torch.arange(self.num_envs) % len(self._multiple_task_names)
        self._enable_task_mask_obs = False

    def get_task_obs_size(self):
        return len(self._multiple_task_names)

    def get_multi_task_info(self):
        return {"onehot_size": len(self._multiple_task_names), "each_subtask_name": self._multiple_task_names}

    def _task_obs(self):
        return torch.nn.functional.one_hot(self._task_index, len(self._multiple_task_names)).float()

    def step(self, actions):
        super().step(actions)
        for index, name in enumerate(self._multiple_task_names):
            self.extras[name] = self._task_index == index
