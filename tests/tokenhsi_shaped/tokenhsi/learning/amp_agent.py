"""AMPAgent: CommonAgent plus a discriminator trained on demo vs. agent AMP observations, whose
reward is mixed into the task reward (task_reward_w, disc_reward_w); adds the losses/disc_loss and
info/disc_* tags, and per-task reward meters for multi-task envs."""
import torch
from rl_games.algos_torch import torch_ext
from rl_games.algos_torch.running_mean_std import RunningMeanStd

import learning.common_agent as common_agent


class ReplayBuffer(object):
    """The last `size` rows stored; samples with replacement."""

    def __init__(self, size, device):
        self._size, self._data = size, None

    def get_total_count(self):
        return 0 if self._data is None else self._data.shape[0]

    def store(self, rows):
        rows = rows if self._data is None else torch.cat([self._data, rows])
        self._data = rows[-self._size:].detach()

    def sample(self, n):
        return self._data[torch.randint(self._data.shape[0], (n,))]


class AMPAgent(common_agent.CommonAgent):
    def __init__(self, base_name, config):
        super().__init__(base_name, config)
        task = self.vec_env.env.task
        if hasattr(task, '_multiple_task_names'):
            self.multi_task_rwd_recoders = {
                n: torch_ext.AverageMeter(self.value_size, self.games_to_track).to(self.ppo_device)
                for n in task._multiple_task_names}
        if self._normalize_amp_input:
            self._amp_input_mean_std = RunningMeanStd(self._amp_observation_space.shape).to(self.ppo_device)

    def init_tensors(self):
        super().init_tensors()
        base_shape = self.experience_buffer.obs_base_shape
        self.experience_buffer.tensor_dict['amp_obs'] = torch.zeros(
            base_shape + self._amp_observation_space.shape, device=self.ppo_device)
        self.tensor_list += ['amp_obs']
        self._amp_obs_demo_buffer = ReplayBuffer(int(self.config['amp_obs_demo_buffer_size']), self.ppo_device)
        self._amp_replay_buffer = ReplayBuffer(int(self.config['amp_replay_buffer_size']), self.ppo_device)

    def set_eval(self):
        super().set_eval()
        if self._normalize_amp_input:
            self._amp_input_mean_std.eval()

    def set_train(self):
        super().set_train()
        if self._normalize_amp_input:
            self._amp_input_mean_std.train()

    def get_stats_weights(self):
        state = super().get_stats_weights()
        if self._normalize_amp_input:
            state['amp_input_mean_std'] = self._amp_input_mean_std.state_dict()
        return state

    def set_stats_weights(self, weights):
        super().set_stats_weights(weights)
        if self._normalize_amp_input:
            self._amp_input_mean_std.load_state_dict(weights['amp_input_mean_std'])

    def _load_config_params(self, config):
        super()._load_config_params(config)
        self._enable_eps_greedy = bool(config['enable_eps_greedy'])
        self._task_reward_w = config['task_reward_w']
        self._disc_reward_w = config['disc_reward_w']
        self._amp_observation_space = self.env_info['amp_observation_space']
        self._amp_batch_size = int(config['amp_batch_size'])
        self._amp_minibatch_size = int(config['amp_minibatch_size'])
        assert self._amp_minibatch_size <= self.minibatch_size
        self._disc_coef = config['disc_coef']
        self._disc_logit_reg = config['disc_logit_reg']
        self._disc_grad_penalty = config['disc_grad_penalty']
        self._disc_weight_decay = config['disc_weight_decay']
        self._disc_reward_scale = config['disc_reward_scale']
        self._normalize_amp_input = config.get('normalize_amp_input', True)

    def _build_net_config(self):
        config = super()._build_net_config()
        config['amp_input_shape'] = self._amp_observation_space.shape
        return config

    def _init_train(self):
        super()._init_train()
        for _ in range(-(-self._amp_obs_demo_buffer._size // self._amp_batch_size)):
            self._amp_obs_demo_buffer.store(self.vec_env.env.fetch_amp_obs_demo(self._amp_batch_size))

    def _record_step(self, n, infos):
        self.experience_buffer.update_data('amp_obs', n, infos['amp_obs'])

    def _record_dones(self, infos):
        for name in getattr(self.vec_env.env.task, '_multiple_task_names', []):
            if infos.get(name, None) is not None:
                done = torch.logical_and(self.dones.bool(), infos[name]).nonzero(as_tuple=False)
                self.multi_task_rwd_recoders[name].update(self.current_rewards[done])

    def _preproc_amp_obs(self, amp_obs):
        return self._amp_input_mean_std(amp_obs) if self._normalize_amp_input else amp_obs

    def _rollout_rewards(self, tensors):
        with torch.no_grad():
            logits = self.model.a2c_network.eval_disc(self._preproc_amp_obs(tensors['amp_obs']))
            prob = torch.sigmoid(logits)
            disc_r = -torch.log(torch.clamp_min(1 - prob, 0.0001)) * self._disc_reward_scale
        rewards = self._task_reward_w * tensors['rewards'] + self._disc_reward_w * disc_r
        return rewards, {'disc_rewards': disc_r}

    def _before_update(self, batch_dict):
        self._amp_obs_demo_buffer.store(self.vec_env.env.fetch_amp_obs_demo(self._amp_batch_size))
        count = batch_dict['amp_obs'].shape[0]
        batch_dict['amp_obs_demo'] = self._amp_obs_demo_buffer.sample(count)
        if self._amp_replay_buffer.get_total_count() == 0:
            batch_dict['amp_obs_replay'] = batch_dict['amp_obs']
        else:
            batch_dict['amp_obs_replay'] = self._amp_replay_buffer.sample(count)

    def _after_update(self, batch_dict):
        self._amp_replay_buffer.store(batch_dict['amp_obs'])

    def prepare_dataset(self, batch_dict):
        super().prepare_dataset(batch_dict)
        for key in ('amp_obs', 'amp_obs_demo', 'amp_obs_replay'):
            self.dataset.values_dict[key] = batch_dict[key]

    def _extra_model_inputs(self, input_dict):
        size = self._amp_minibatch_size
        inputs = {key: self._preproc_amp_obs(input_dict[key][0:size])
                  for key in ('amp_obs', 'amp_obs_replay', 'amp_obs_demo')}
        inputs['amp_obs_demo'].requires_grad_(True)
        return inputs

    def _extra_losses(self, batch_dict, res_dict):
        agent_logit = torch.cat([res_dict['disc_agent_logit'], res_dict['disc_agent_replay_logit']], dim=0)
        info = self._disc_loss(agent_logit, res_dict['disc_demo_logit'], batch_dict['amp_obs_demo'])
        disc_loss, info['disc_loss'] = info['disc_loss'], info['disc_loss'].detach()
        return self._disc_coef * disc_loss, info

    def _disc_loss(self, disc_agent_logit, disc_demo_logit, obs_demo):
        bce = torch.nn.BCEWithLogitsLoss()
        disc_loss = 0.5 * (bce(disc_agent_logit, torch.zeros_like(disc_agent_logit))
                           + bce(disc_demo_logit, torch.ones_like(disc_demo_logit)))
        network = self.model.a2c_network
        disc_logit_loss = torch.sum(torch.square(network.get_disc_logit_weights()))
        grad = torch.autograd.grad(disc_demo_logit, obs_demo, grad_outputs=torch.ones_like(disc_demo_logit),
                                   create_graph=True, retain_graph=True, only_inputs=True)[0]
        disc_grad_penalty = torch.mean(torch.sum(torch.square(grad), dim=-1))
        disc_loss = disc_loss + self._disc_logit_reg * disc_logit_loss + self._disc_grad_penalty * disc_grad_penalty
        if self._disc_weight_decay != 0:
            weights = torch.cat(network.get_disc_weights(), dim=-1)
            disc_loss = disc_loss + self._disc_weight_decay * torch.sum(torch.square(weights))
        return {'disc_loss': disc_loss, 'disc_grad_penalty': disc_grad_penalty.detach(),
                'disc_logit_loss': disc_logit_loss.detach(),
                'disc_agent_acc': torch.mean((disc_agent_logit < 0).float()),
                'disc_demo_acc': torch.mean((disc_demo_logit > 0).float()),
                'disc_agent_logit': torch.mean(disc_agent_logit.detach()),
                'disc_demo_logit': torch.mean(disc_demo_logit.detach())}

    def _record_train_batch_info(self, batch_dict, train_info):
        super()._record_train_batch_info(batch_dict, train_info)
        train_info['disc_rewards'] = batch_dict['disc_rewards']

    def _log_train_info(self, train_info, frame):
        super()._log_train_info(train_info, frame)
        mean = torch_ext.mean_list
        self.writer.add_scalar('losses/disc_loss', mean(train_info['disc_loss']).item(), frame)
        for key in ('disc_agent_acc', 'disc_demo_acc', 'disc_agent_logit', 'disc_demo_logit',
                    'disc_grad_penalty', 'disc_logit_loss'):
            self.writer.add_scalar('info/' + key, mean(train_info[key]).item(), frame)
        disc_reward_std, disc_reward_mean = torch.std_mean(train_info['disc_rewards'])
        self.writer.add_scalar('info/disc_reward_mean', disc_reward_mean.item(), frame)
        self.writer.add_scalar('info/disc_reward_std', disc_reward_std.item(), frame)
