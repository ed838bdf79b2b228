"""TokenHSI's entry point, in TokenHSI's shape: `python tokenhsi/run.py --task T --cfg_env E --cfg_train Y ...`
trains (or with --test plays, with --test --eval evaluates) an rl_games 1.1.4 agent on a task."""
import os

from utils.config import set_np_formatting, set_seed, get_args, parse_sim_params, load_cfg
from utils.parse_task import parse_task

from rl_games.algos_torch import torch_ext
from rl_games.common import env_configurations, vecenv
from rl_games.common.algo_observer import AlgoObserver
from rl_games.torch_runner import Runner

from learning import amp_agent
from learning import amp_players
from learning import amp_models
from learning import amp_network_builder
from learning.transformer import amp_network_builder_transformer
from learning.transformer import trans_agent
from learning.transformer import trans_players

args = None
cfg = None
cfg_train = None


def create_rlgpu_env(**kwargs):
    if cfg_train['params']['config'].get('multi_gpu', False):
        raise RuntimeError("multi_gpu (horovod) is not available here")
    sim_params = parse_sim_params(args, cfg, cfg_train)
    task, env = parse_task(args, cfg, cfg_train, sim_params)
    print('num_envs: {:d}'.format(env.num_envs))
    print('num_actions: {:d}'.format(env.num_actions))
    print('num_obs: {:d}'.format(env.num_obs))
    print('num_states: {:d}'.format(env.num_states))
    return env


class RLGPUAlgoObserver(AlgoObserver):
    def __init__(self, use_successes=True):
        self.use_successes = use_successes

    def after_init(self, algo):
        self.algo = algo
        self.consecutive_successes = torch_ext.AverageMeter(1, self.algo.games_to_track).to(self.algo.ppo_device)
        self.writer = self.algo.writer

    def process_infos(self, infos, done_indices):
        if isinstance(infos, dict):
            if not self.use_successes and 'consecutive_successes' in infos:
                self.consecutive_successes.update(infos['consecutive_successes'].clone().to(self.algo.ppo_device))
            if self.use_successes and 'successes' in infos:
                successes = infos['successes'].clone()
                self.consecutive_successes.update(successes[done_indices].to(self.algo.ppo_device))

    def after_clear_stats(self):
        self.consecutive_successes.clear()

    def after_print_stats(self, frame, epoch_num, total_time):
        if self.consecutive_successes.current_size > 0:
            mean_con_successes = self.consecutive_successes.get_mean()
            self.writer.add_scalar('successes/consecutive_successes/mean', mean_con_successes, frame)
            self.writer.add_scalar('successes/consecutive_successes/iter', mean_con_successes, epoch_num)
            self.writer.add_scalar('successes/consecutive_successes/time', mean_con_successes, total_time)


class RLGPUEnv(vecenv.IVecEnv):
    def __init__(self, config_name, num_actors, **kwargs):
        self.env = env_configurations.configurations[config_name]['env_creator'](**kwargs)
        self.use_global_obs = (self.env.num_states > 0)
        self.full_state = {}
        self.full_state["obs"] = self.reset()
        if self.use_global_obs:
            self.full_state["states"] = self.env.get_state()

    def step(self, action):
        next_obs, reward, is_done, info = self.env.step(action)
        self.full_state["obs"] = next_obs
        if self.use_global_obs:
            self.full_state["states"] = self.env.get_state()
            return self.full_state, reward, is_done, info
        return self.full_state["obs"], reward, is_done, info

    def reset(self, env_ids=None):
        self.full_state["obs"] = self.env.reset(env_ids)
        if self.use_global_obs:
            self.full_state["states"] = self.env.get_state()
            return self.full_state
        return self.full_state["obs"]

    def get_number_of_agents(self):
        return self.env.get_number_of_agents()

    def get_env_info(self):
        info = {'action_space': self.env.action_space, 'observation_space': self.env.observation_space,
                'amp_observation_space': self.env.amp_observation_space}
        if self.use_global_obs:
            info['state_space'] = self.env.state_space
        print(info['action_space'], info['observation_space'])
        return info


vecenv.register('RLGPU', lambda config_name, num_actors, **kwargs: RLGPUEnv(config_name, num_actors, **kwargs))
env_configurations.register('rlgpu', {
    'env_creator': lambda **kwargs: create_rlgpu_env(**kwargs),
    'vecenv_type': 'RLGPU'})


def build_alg_runner(algo_observer):
    runner = Runner(algo_observer)
    runner.algo_factory.register_builder('amp', lambda **kwargs: amp_agent.AMPAgent(**kwargs))
    runner.player_factory.register_builder('amp', lambda **kwargs: amp_players.AMPPlayerContinuous(**kwargs))
    runner.model_builder.model_factory.register_builder(
        'amp', lambda network, **kwargs: amp_models.ModelAMPContinuous(network))
    runner.model_builder.network_factory.register_builder('amp', lambda **kwargs: amp_network_builder.AMPBuilder())

    runner.algo_factory.register_builder('trans', lambda **kwargs: trans_agent.TransAgent(**kwargs))
    runner.player_factory.register_builder('trans', lambda **kwargs: trans_players.TransPlayerContinuous(**kwargs))
    runner.model_builder.network_factory.register_builder(
        'amp_transformer_multi_task',
        lambda **kwargs: amp_network_builder_transformer.AMPTransformerMultiTaskBuilder())
    return runner


def main():
    global args
    global cfg
    global cfg_train

    set_np_formatting()
    args = get_args()
    cfg, cfg_train, logdir = load_cfg(args)

    cfg_train['params']['seed'] = cfg_train['params']['config']['seed'] = set_seed(
        cfg_train['params'].get("seed", -1), cfg_train['params'].get("torch_deterministic", False))

    if args.horovod:
        cfg_train['params']['config']['multi_gpu'] = args.horovod
    if args.horizon_length != -1:
        cfg_train['params']['config']['horizon_length'] = args.horizon_length
    if args.minibatch_size != -1:
        cfg_train['params']['config']['minibatch_size'] = args.minibatch_size
    if args.motion_file:
        cfg['env']['motion_file'] = args.motion_file

    cfg_train['params']['config']['train_dir'] = args.output_path

    vargs = vars(args)

    algo_observer = RLGPUAlgoObserver()

    runner = build_alg_runner(algo_observer)
    runner.load(cfg_train)
    runner.reset()
    runner.run(vargs)

    return


if __name__ == '__main__':
    main()
