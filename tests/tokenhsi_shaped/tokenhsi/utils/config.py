"""Command line and yaml loading with TokenHSI's flags and TokenHSI's load_cfg behaviour (argparse
stands in for isaacgym.gymutil; the yaml files are read with SafeLoader, so `2e-5` stays a string)."""
import argparse
import os
import random

import numpy as np
import torch
import yaml


def set_np_formatting():
    np.set_printoptions(edgeitems=30, infstr='inf', linewidth=4000, nanstr='nan', precision=2,
                        suppress=False, threshold=10000, formatter=None)


def set_seed(seed, torch_deterministic=False):
    if seed == -1:
        seed = 42 if torch_deterministic else np.random.randint(0, 10000)
    print("Setting seed: {}".format(seed))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ['PYTHONHASHSEED'] = str(seed)
    return seed


def load_cfg(args):
    with open(os.path.join(os.getcwd(), args.cfg_train), 'r') as f:
        cfg_train = yaml.load(f, Loader=yaml.SafeLoader)
    with open(os.path.join(os.getcwd(), args.cfg_env), 'r') as f:
        cfg = yaml.load(f, Loader=yaml.SafeLoader)

    if args.num_envs > 0:
        cfg["env"]["numEnvs"] = args.num_envs
    if args.episode_length > 0:
        cfg["env"]["episodeLength"] = args.episode_length
    cfg["name"] = args.task
    cfg["headless"] = args.headless
    cfg.setdefault("task", {"randomize": False})

    logdir = args.logdir
    if args.torch_deterministic:
        cfg_train["params"]["torch_deterministic"] = True

    config = cfg_train["params"]["config"]
    if args.experiment != 'Base':
        config['name'] = args.experiment
    if args.resume > 0:
        cfg_train["params"]["load_checkpoint"] = True
    if args.checkpoint != "Base":
        cfg_train["params"]["load_path"] = args.checkpoint
        cfg["env"]["checkpoint"] = args.checkpoint
    if args.hrl_checkpoint != "":
        config["hrl_checkpoint"] = args.hrl_checkpoint
    config["eval"] = bool(args.eval and args.test)
    config["eval_task"] = args.eval_task
    if args.max_iterations > 0:
        config['max_epochs'] = args.max_iterations
    config["num_actors"] = cfg["env"]["numEnvs"]
    config["device"] = args.rl_device

    seed = cfg_train["params"].get("seed", -1)
    if args.seed is not None:
        seed = args.seed
    cfg["seed"] = seed
    cfg_train["params"]["seed"] = seed
    cfg["args"] = args
    return cfg, cfg_train, logdir


def parse_sim_params(args, cfg, cfg_train):
    """The simulation settings (a dict here: there is no simulator, only cfg['sim'] passed on)."""
    sim_params = {"dt": 1.0 / 60.0, "physics_engine": args.physics_engine}
    sim_params.update(cfg.get("sim") or {})
    return sim_params


FLAGS = [
    ("--test", dict(action="store_true", default=False)),
    ("--play", dict(action="store_true", default=False)),
    ("--resume", dict(type=int, default=0)),
    ("--checkpoint", dict(type=str, default="Base")),
    ("--headless", dict(action="store_true", default=False)),
    ("--horovod", dict(action="store_true", default=False)),
    ("--task", dict(type=str, default="Humanoid")),
    ("--rl_device", dict(type=str, default="cuda:0")),
    ("--logdir", dict(type=str, default="logs/")),
    ("--experiment", dict(type=str, default="Base")),
    ("--cfg_env", dict(type=str, default="Base")),
    ("--cfg_train", dict(type=str, default="Base")),
    ("--motion_file", dict(type=str, default="")),
    ("--num_envs", dict(type=int, default=0)),
    ("--episode_length", dict(type=int, default=0)),
    ("--seed", dict(type=int)),
    ("--max_iterations", dict(type=int, default=0)),
    ("--horizon_length", dict(type=int, default=-1)),
    ("--minibatch_size", dict(type=int, default=-1)),
    ("--torch_deterministic", dict(action="store_true", default=False)),
    ("--output_path", dict(type=str, default="output/")),
    ("--hrl_checkpoint", dict(type=str, default="")),
    ("--eval", dict(action="store_true", default=False)),
    ("--eval_task", dict(type=str, default="")),
]


def get_args():
    parser = argparse.ArgumentParser(description="RL Policy")
    for name, options in FLAGS:
        parser.add_argument(name, **options)
    parser.add_argument("--physics_engine", type=str, default="physx")
    args = parser.parse_args()
    args.device_id = 0
    args.device = 'cpu'
    if args.test:
        args.play = args.test
        args.train = False
    elif args.play:
        args.train = False
    else:
        args.train = True
    return args
