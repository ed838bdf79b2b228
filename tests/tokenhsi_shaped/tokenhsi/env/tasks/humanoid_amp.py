"""A pure-torch stand-in for TokenHSI's IsaacGym humanoid: a 2-D point per env that must reach a target.

It keeps the task interface the agents and players use: obs_buf/rew_buf/reset_buf/extras after
`step`, `reset(env_ids)`, AMP observations (`extras['amp_obs']`, `fetch_amp_obs_demo`), and the
eval signals `success`, `precision`, `terminate` (plus `successes` for RLGPUAlgoObserver).
"""
import torch


class HumanoidAMP(object):
    def __init__(self, cfg, sim_params, physics_engine, device_type, device_id, headless):
        env = cfg["env"]
        self.cfg = cfg
        self.num_envs = env["numEnvs"]
        self.max_episode_length = env["episodeLength"]
        self._num_amp_obs_steps = env["numAMPObsSteps"]
        self._enable_task_obs = env["enableTaskObs"]
        self._success_radius = env["successRadius"]
        self.device = "cpu"
        self.viewer = None
        self.num_actions = 2
        self.num_states = 0
        self.num_obs = 4 + self.get_task_obs_size()
        self._generator = torch.Generator().manual_seed(int(cfg.get("seed", 0)) % (2 ** 31))
        n = self.num_envs
        self._pos = torch.zeros(n, 2)
        self._prev_pos = torch.zeros(n, 2)
        self._target = torch.zeros(n, 2)
        self.progress_buf = torch.zeros(n, dtype=torch.long)
        self.obs_buf = torch.zeros(n, self.num_obs)
        self.rew_buf = torch.zeros(n)
        self.reset_buf = torch.ones(n, dtype=torch.long)
        self.states_buf = torch.zeros(n, 0)
        self.extras = {}

    def get_obs_size(self):
        return self.num_obs

    def get_task_obs_size(self):
        return 0

    def get_num_amp_obs(self):
        return 2 * self._num_amp_obs_steps

    def _task_obs(self):
        return self.obs_buf.new_zeros(self.num_envs, 0)

    def _compute_observations(self):
        self.obs_buf = torch.cat([self._pos, self._target - self._pos, self._task_obs()], dim=-1)

    def reset(self, env_ids=None):
        if env_ids is None:
            env_ids = torch.arange(self.num_envs)
        if len(env_ids) > 0:
            count = len(env_ids)
            self._pos[env_ids] = 0.2 * torch.randn(count, 2, generator=self._generator)
            self._prev_pos[env_ids] = self._pos[env_ids]
            self._target[env_ids] = torch.rand(count, 2, generator=self._generator) * 2 - 1
            self.progress_buf[env_ids] = 0
            self.reset_buf[env_ids] = 0
        self._compute_observations()

    def step(self, actions):
        self._prev_pos = self._pos.clone()
        self._pos = self._pos + 0.25 * actions.clamp(-1, 1)
        self.progress_buf += 1
        distance = torch.linalg.norm(self._target - self._pos, dim=-1)
        self.rew_buf = torch.exp(-2.0 * distance)
        success = distance < self._success_radius
        terminate = self._pos.abs().max(dim=-1).values > 2.0
        self.reset_buf = (success | terminate | (self.progress_buf >= self.max_episode_length)).long()
        self._compute_observations()
        self.extras = {
            "amp_obs": torch.cat([self._prev_pos, self._pos], dim=-1),
            "terminate": terminate,
            "success": success,
            "successes": success.float(),
            "precision": distance.double(),
        }

    def fetch_amp_obs_demo(self, num_samples):
        """Demo motion: short straight steps from random points."""
        start = 0.5 * torch.randn(num_samples, 2, generator=self._generator)
        step = 0.1 * torch.randn(num_samples, 2, generator=self._generator)
        return torch.cat([start, start + step], dim=-1)
