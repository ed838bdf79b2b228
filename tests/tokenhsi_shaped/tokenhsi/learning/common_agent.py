"""CommonAgent: rl_games 1.1.4's continuous PPO agent with TokenHSI's training loop and TensorBoard tags.

The loop writes, per epoch: performance/total_fps, performance/step_fps, info/epochs, the train
info (_log_train_info), then calls algo_observer.after_print_stats(frame, epoch, total_time), then
rewards{i}/frame|iter|time (and reward_{task}/... for multi-task envs), episode_lengths/frame|iter,
and saves `nn/<name>` every save_frequency epochs and when epoch > max_epochs. As in TokenHSI, the
tags are written against the frame count from before the epoch and self.frame is advanced before
the saves, so a checkpoint stores the frame count after its epoch.
"""
import os
import time

import numpy as np
import torch
from torch import nn, optim

from rl_games.algos_torch import a2c_continuous, torch_ext
from rl_games.algos_torch.running_mean_std import RunningMeanStd
from rl_games.common import a2c_common, datasets


class CommonAgent(a2c_continuous.A2CAgent):
    def __init__(self, base_name, config):
        a2c_common.A2CBase.__init__(self, base_name, config)
        self._load_config_params(config)
        np.savetxt(os.path.join(self.experiment_dir, "random_seed.txt"), [config["seed"]])

        self.is_discrete = False
        action_space = self.env_info['action_space']
        self.actions_num = action_space.shape[0]
        self.actions_low = torch.from_numpy(action_space.low.copy()).float().to(self.ppo_device)
        self.actions_high = torch.from_numpy(action_space.high.copy()).float().to(self.ppo_device)
        self.bounds_loss_coef = config.get('bounds_loss_coef', None)
        self.clip_actions = config.get('clip_actions', True)
        self._save_intermediate = config.get('save_intermediate', False)

        self.model = self.network.build(self._build_net_config())
        self.model.to(self.ppo_device)
        self.states = None
        self.init_rnn_from_model(self.model)
        self.last_lr = float(self.last_lr)
        self.optimizer = optim.Adam(self.model.parameters(), self.last_lr, eps=1e-08, weight_decay=self.weight_decay)
        if self.normalize_input:
            self.running_mean_std = RunningMeanStd(self.obs_shape).to(self.ppo_device)
        self.dataset = datasets.PPODataset(self.batch_size, self.minibatch_size, self.is_discrete, self.is_rnn,
                                           self.ppo_device, self.seq_len)
        self.algo_observer.after_init(self)

    def init_tensors(self):
        super().init_tensors()
        tensors = self.experience_buffer.tensor_dict
        tensors['next_obses'] = torch.zeros_like(tensors['obses'])
        tensors['next_values'] = torch.zeros_like(tensors['values'])
        self.tensor_list += ['next_obses']

    def train(self):
        self.init_tensors()
        self.last_mean_rewards = -100500
        total_time = 0
        self.frame = 0
        self.obs = self.env_reset()
        self.curr_frames = self.batch_size_envs
        model_output_file = os.path.join(self.nn_dir, self.config['name'])
        self._init_train()

        while True:
            epoch_num = self.update_epoch()
            train_info = self.train_epoch()
            sum_time = train_info['total_time']
            total_time += sum_time
            frame = self.frame
            if self.rank != 0:
                continue
            curr_frames = self.curr_frames
            self.frame += curr_frames
            if self.print_stats:
                print('fps step: {:.1f} fps total: {:.1f}'.format(curr_frames / train_info['play_time'],
                                                                 curr_frames / sum_time))
            self.writer.add_scalar('performance/total_fps', curr_frames / sum_time, frame)
            self.writer.add_scalar('performance/step_fps', curr_frames / train_info['play_time'], frame)
            self.writer.add_scalar('info/epochs', epoch_num, frame)
            self._log_train_info(train_info, frame)
            self.algo_observer.after_print_stats(frame, epoch_num, total_time)

            if self.game_rewards.current_size > 0:
                mean_rewards = self._get_mean_rewards()
                mean_lengths = self.game_lengths.get_mean()
                steps = (('frame', frame), ('iter', epoch_num), ('time', total_time))
                for i in range(self.value_size):
                    for axis, step in steps:
                        self.writer.add_scalar('rewards{}/{}'.format(i, axis), mean_rewards[i], step)
                    for name in getattr(self.vec_env.env.task, '_multiple_task_names', []):
                        task_mean = self.multi_task_rwd_recoders[name].get_mean()
                        if task_mean.shape != ():
                            for axis, step in steps:
                                self.writer.add_scalar('reward_{}/{}'.format(name, axis), task_mean[i], step)
                self.writer.add_scalar('episode_lengths/frame', mean_lengths, frame)
                self.writer.add_scalar('episode_lengths/iter', mean_lengths, epoch_num)

            if self.save_freq > 0 and epoch_num % self.save_freq == 0:
                self.save(model_output_file)
                if self._save_intermediate:
                    self.save(model_output_file + '_' + str(epoch_num).zfill(8))
            if epoch_num > self.max_epochs:
                self.save(model_output_file)
                print('MAX EPOCHS NUM!')
                return self.last_mean_rewards, epoch_num

    def train_epoch(self):
        play_time_start = time.time()
        with torch.no_grad():
            batch_dict = self.play_steps()
        play_time_end = time.time()
        self._before_update(batch_dict)
        self.set_train()
        self.curr_frames = batch_dict.pop('played_frames')
        self.prepare_dataset(batch_dict)
        self.algo_observer.after_steps()

        train_info = {}
        for _ in range(self.mini_epochs_num):
            for i in range(len(self.dataset)):
                curr_train_info = self.train_actor_critic(self.dataset[i])
                self.last_lr, self.entropy_coef = self.scheduler.update(
                    self.last_lr, self.entropy_coef, self.epoch_num, 0, curr_train_info['kl'].item())
                self.update_lr(self.last_lr)
                for k, v in curr_train_info.items():
                    train_info.setdefault(k, []).append(v)
        update_time_end = time.time()
        self._after_update(batch_dict)
        train_info['play_time'] = play_time_end - play_time_start
        train_info['update_time'] = update_time_end - play_time_end
        train_info['total_time'] = update_time_end - play_time_start
        self._record_train_batch_info(batch_dict, train_info)
        return train_info

    def play_steps(self):
        self.set_eval()
        done_indices = []
        for n in range(self.horizon_length):
            self.obs = self.env_reset(done_indices)
            self.experience_buffer.update_data('obses', n, self.obs['obs'])
            res_dict = self.get_action_values(self.obs)
            for k in self.update_list:
                self.experience_buffer.update_data(k, n, res_dict[k])
            self.obs, rewards, self.dones, infos = self.env_step(res_dict['actions'])
            self.experience_buffer.update_data('rewards', n, self.rewards_shaper(rewards))
            self.experience_buffer.update_data('next_obses', n, self.obs['obs'])
            self.experience_buffer.update_data('dones', n, self.dones)
            self._record_step(n, infos)
            next_vals = self._eval_critic(self.obs) * (1.0 - infos['terminate'].float().unsqueeze(-1))
            self.experience_buffer.update_data('next_values', n, next_vals)

            self.current_rewards += rewards
            self.current_lengths += 1
            done_indices = self.dones.nonzero(as_tuple=False)[::self.num_agents]
            self.game_rewards.update(self.current_rewards[done_indices])
            self.game_lengths.update(self.current_lengths[done_indices])
            self.algo_observer.process_infos(infos, done_indices)
            self._record_dones(infos)
            not_dones = 1.0 - self.dones.float()
            self.current_rewards = self.current_rewards * not_dones.unsqueeze(1)
            self.current_lengths = self.current_lengths * not_dones
            done_indices = done_indices[:, 0]

        tensors = self.experience_buffer.tensor_dict
        mb_rewards, extra = self._rollout_rewards(tensors)
        mb_advs = self.discount_values(tensors['dones'].float(), tensors['values'], mb_rewards, tensors['next_values'])
        batch_dict = self.experience_buffer.get_transformed_list(a2c_common.swap_and_flatten01, self.tensor_list)
        batch_dict['returns'] = a2c_common.swap_and_flatten01(mb_advs + tensors['values'])
        batch_dict['played_frames'] = self.batch_size
        for k, v in extra.items():
            batch_dict[k] = a2c_common.swap_and_flatten01(v)
        return batch_dict

    def prepare_dataset(self, batch_dict):
        values, returns = batch_dict['values'], batch_dict['returns']
        advantages = torch.sum(returns - values, axis=1)
        if self.normalize_advantage:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        if self.normalize_value:
            values = self.value_mean_std(values)
            returns = self.value_mean_std(returns)
        self.dataset.update_values_dict({
            'old_values': values, 'old_logp_actions': batch_dict['neglogpacs'], 'advantages': advantages,
            'returns': returns, 'actions': batch_dict['actions'], 'obs': batch_dict['obses'],
            'rnn_states': None, 'rnn_masks': None, 'mu': batch_dict['mus'], 'sigma': batch_dict['sigmas']})

    def calc_gradients(self, input_dict):
        self.set_train()
        batch_dict = {'is_train': True, 'prev_actions': input_dict['actions'],
                      'obs': self._preproc_obs(input_dict['obs'])}
        batch_dict.update(self._extra_model_inputs(input_dict))
        res_dict = self.model(batch_dict)
        mu, sigma = res_dict['mus'], res_dict['sigmas']
        ratio = torch.exp(input_dict['old_logp_actions'] - res_dict['prev_neglogp'])
        advantage = input_dict['advantages']
        a_loss = torch.max(-advantage * ratio, -advantage * torch.clamp(ratio, 1.0 - self.e_clip, 1.0 + self.e_clip))
        a_loss = torch.mean(a_loss)
        a_clip_frac = torch.mean((torch.abs(ratio - 1.0) > self.e_clip).float())
        c_loss = torch.mean((input_dict['returns'] - res_dict['values']) ** 2)
        b_loss = torch.mean(self.bound_loss(mu))
        entropy = torch.mean(res_dict['entropy'])
        extra_loss, extra_info = self._extra_losses(batch_dict, res_dict)
        loss = (a_loss + self.critic_coef * c_loss - self.entropy_coef * entropy + self.bounds_loss_coef * b_loss
                + extra_loss)

        self.optimizer.zero_grad()
        loss.backward()
        if self.truncate_grads:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_norm)
        self.optimizer.step()
        with torch.no_grad():
            kl_dist = torch_ext.policy_kl(mu.detach(), sigma.detach(), input_dict['mu'], input_dict['sigma'], True)
        self.train_result = {'entropy': entropy.detach(), 'kl': kl_dist, 'last_lr': self.last_lr, 'lr_mul': 1.0,
                             'b_loss': b_loss.detach(), 'actor_loss': a_loss.detach(),
                             'actor_clip_frac': a_clip_frac, 'critic_loss': c_loss.detach()}
        self.train_result.update(extra_info)

    def discount_values(self, mb_fdones, mb_values, mb_rewards, mb_next_values):
        lastgaelam = 0
        mb_advs = torch.zeros_like(mb_rewards)
        for t in reversed(range(self.horizon_length)):
            not_done = (1.0 - mb_fdones[t]).unsqueeze(1)
            delta = mb_rewards[t] + self.gamma * mb_next_values[t] - mb_values[t]
            lastgaelam = delta + self.gamma * self.tau * not_done * lastgaelam
            mb_advs[t] = lastgaelam
        return mb_advs

    def env_reset(self, env_ids=None):
        return self.obs_to_tensors(self.vec_env.reset(env_ids))

    def bound_loss(self, mu):
        if self.bounds_loss_coef is None:
            return torch.zeros(mu.shape[0], device=mu.device)
        return (torch.clamp_min(mu - 1.0, 0.0) ** 2 + torch.clamp_max(mu + 1.0, 0.0) ** 2).sum(axis=-1)

    def _get_mean_rewards(self):
        return self.game_rewards.get_mean()

    def _load_config_params(self, config):
        self.last_lr = config['learning_rate']

    def _build_net_config(self):
        return {'actions_num': self.actions_num, 'input_shape': self.obs_shape,
                'num_seqs': self.num_actors * self.num_agents, 'value_size': self.env_info.get('value_size', 1)}

    def _init_train(self):
        pass

    def _eval_critic(self, obs_dict):
        self.model.eval()
        value = self.model.a2c_network.eval_critic(self._preproc_obs(obs_dict['obs']))
        if self.normalize_value:
            value = self.value_mean_std(value, True)
        return value

    # hooks the AMP agent fills in
    def _record_step(self, n, infos):
        pass

    def _record_dones(self, infos):
        pass

    def _rollout_rewards(self, tensors):
        return tensors['rewards'], {}

    def _before_update(self, batch_dict):
        pass

    def _after_update(self, batch_dict):
        pass

    def _extra_model_inputs(self, input_dict):
        return {}

    def _extra_losses(self, batch_dict, res_dict):
        return 0.0, {}

    def _record_train_batch_info(self, batch_dict, train_info):
        pass

    def _log_train_info(self, train_info, frame):
        mean = torch_ext.mean_list
        self.writer.add_scalar('performance/update_time', train_info['update_time'], frame)
        self.writer.add_scalar('performance/play_time', train_info['play_time'], frame)
        self.writer.add_scalar('losses/a_loss', mean(train_info['actor_loss']).item(), frame)
        self.writer.add_scalar('losses/c_loss', mean(train_info['critic_loss']).item(), frame)
        self.writer.add_scalar('losses/bounds_loss', mean(train_info['b_loss']).item(), frame)
        self.writer.add_scalar('losses/entropy', mean(train_info['entropy']).item(), frame)
        self.writer.add_scalar('info/last_lr', train_info['last_lr'][-1] * train_info['lr_mul'][-1], frame)
        self.writer.add_scalar('info/lr_mul', train_info['lr_mul'][-1], frame)
        self.writer.add_scalar('info/e_clip', self.e_clip * train_info['lr_mul'][-1], frame)
        self.writer.add_scalar('info/clip_frac', mean(train_info['actor_clip_frac']).item(), frame)
        self.writer.add_scalar('info/kl', mean(train_info['kl']).item(), frame)
