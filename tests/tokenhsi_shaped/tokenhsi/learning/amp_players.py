"""AMPPlayerContinuous: plays a checkpoint; with config `eval` (--test --eval) runs TokenHSI's
evaluation instead: 3 repeats (ObjectSet_test_0..2) of one trial per env, counted at each env's first
episode end, written as JSON to <dirname(ckpt)>/../metrics/<basename(ckpt)[:-4]>/metrics_<time>.json."""
import datetime
import json
import os

import torch
from rl_games.algos_torch.running_mean_std import RunningMeanStd

import learning.common_player as common_player
from utils.torch_utils import load_checkpoint


class AMPPlayerContinuous(common_player.CommonPlayer):
    def __init__(self, config):
        self._eval = config["eval"]
        self._normalize_amp_input = config.get('normalize_amp_input', True)
        self._disc_reward_scale = config['disc_reward_scale']
        super().__init__(config)

    def restore(self, fn):
        if fn != 'Base':
            self._checkpoint_fn = fn
            checkpoint = load_checkpoint(fn, self.device)
            self.model.load_state_dict(checkpoint['model'])
            if self.normalize_input:
                self.running_mean_std.load_state_dict(checkpoint['running_mean_std'])
            if self._normalize_amp_input:
                self._amp_input_mean_std.load_state_dict(checkpoint['amp_input_mean_std'])

    def _build_net(self, config):
        super()._build_net(config)
        if self._normalize_amp_input:
            self._amp_input_mean_std = RunningMeanStd(config['amp_input_shape']).to(self.device)
            self._amp_input_mean_std.eval()

    def _build_net_config(self):
        config = super()._build_net_config()
        config['amp_input_shape'] = self.env.amp_observation_space.shape
        return config

    def run(self):
        if self._eval:
            self.run_eval()
        else:
            super().run()

    def run_eval(self):
        num_envs = self.env.num_envs
        print("evaluating policy: {} trials".format(num_envs))
        eval_res = {}
        for i in range(3):
            obs_dict = self.env_reset()
            self.get_batch_size(obs_dict['obs'], 1)
            played = success = fail = fail_terminate = 0
            sum_precision = 0.0
            collected = torch.zeros(num_envs, dtype=torch.bool, device=self.device)
            reset_ids = []
            while played < num_envs:
                obs_dict = self.env_reset(reset_ids)
                obs_dict, r, done, info = self.env_step(self.env, self.get_action(obs_dict, self.is_determenistic))
                reset_ids = done.nonzero(as_tuple=False)[::self.num_agents, 0]
                first = done.bool() & ~collected
                collected |= first
                ids = first.nonzero(as_tuple=False)[:, 0]
                if len(ids) == 0:
                    continue
                played += len(ids)
                succeeded = info['success'][ids].bool()
                terminated = info['terminate'][ids].bool() & ~succeeded
                success += int(succeeded.sum())
                fail_terminate += int(terminated.sum())
                fail += len(ids) - int(succeeded.sum()) - int(terminated.sum())
                sum_precision += float(info['precision'][ids][succeeded].sum())
            name = "ObjectSet_{}_{}".format("test", i)
            eval_res[name] = {"num_trials": played, "success_trials": success, "success_rate": success / played,
                              "success_precision": sum_precision / success if success > 0 else 0,
                              "fail_trials": fail, "fail_trials_because_terminate": fail_terminate,
                              "fail_trials_total": fail + fail_terminate}
            print(name)
            print(eval_res[name])
        time = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        save_dir = self._metrics_dir()
        os.makedirs(save_dir, exist_ok=True)
        path = os.path.join(save_dir, "metrics_{}.json".format(time))
        with open(path, 'w') as f:
            json.dump(eval_res, f)
        print("save at {}".format(path))

    def _metrics_dir(self):
        folder, name = os.path.split(self._checkpoint_fn)
        return os.path.join(folder, "../metrics", name[:-4])
