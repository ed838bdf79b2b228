import torch
from rl_games.algos_torch import players
from rl_games.algos_torch.running_mean_std import RunningMeanStd
from rl_games.common.player import BasePlayer


class CommonPlayer(players.PpoPlayerContinuous):
    """rl_games 1.1.4's continuous PPO player over a TokenHSI env (tensor observations, reset by ids)."""

    def __init__(self, config):
        config.setdefault('device_name', config.get('device', 'cuda'))  # the rl_device, as the agent uses
        BasePlayer.__init__(self, config)
        self.network = config['network']
        self.actions_num = self.action_space.shape[0]
        self.actions_low = torch.from_numpy(self.action_space.low.copy()).float().to(self.device)
        self.actions_high = torch.from_numpy(self.action_space.high.copy()).float().to(self.device)
        self.mask = [False]
        self.normalize_input = self.config['normalize_input']
        self._build_net(self._build_net_config())

    def run(self):
        """Play games_num episodes and print the mean reward and length."""
        games_played, sum_rewards, sum_steps = 0, 0.0, 0.0
        obs_dict = self.env_reset()
        batch_size = self.get_batch_size(obs_dict['obs'], 1)
        rewards = torch.zeros(batch_size, device=self.device)
        steps = torch.zeros(batch_size, device=self.device)
        done_indices = []
        while games_played < self.games_num:
            obs_dict = self.env_reset(done_indices)
            action = self.get_action(obs_dict, self.is_determenistic)
            obs_dict, r, done, info = self.env_step(self.env, action)
            rewards += r
            steps += 1
            self._post_step(info)
            done_indices = done.nonzero(as_tuple=False)[::self.num_agents, 0]
            games_played += len(done_indices)
            sum_rewards += rewards[done_indices].sum().item()
            sum_steps += steps[done_indices].sum().item()
            rewards[done_indices] = 0
            steps[done_indices] = 0
        print('av reward:', sum_rewards / games_played, 'av steps:', sum_steps / games_played)

    def obs_to_torch(self, obs):
        return {'obs': super().obs_to_torch(obs)}

    def get_action(self, obs_dict, is_determenistic=False):
        return super().get_action(obs_dict['obs'], is_determenistic)

    def env_step(self, env, actions):
        obs, rewards, dones, infos = env.step(actions)
        return self.obs_to_torch(obs), rewards.to(self.device), dones.to(self.device), infos

    def env_reset(self, env_ids=None):
        return self.obs_to_torch(self.env.reset(env_ids))

    def _build_net(self, config):
        self.model = self.network.build(config)
        self.model.to(self.device)
        self.model.eval()
        self.is_rnn = self.model.is_rnn()
        if self.normalize_input:
            self.running_mean_std = RunningMeanStd(self.obs_shape).to(self.device)
            self.running_mean_std.eval()

    def _post_step(self, info):
        pass

    def _build_net_config(self):
        return {'actions_num': self.actions_num, 'input_shape': self.obs_shape, 'num_seqs': self.num_agents}
