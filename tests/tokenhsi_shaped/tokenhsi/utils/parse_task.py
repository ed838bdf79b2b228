from env.tasks.basic_interaction_skills.humanoid_traj import HumanoidTraj  # noqa: F401 (named by --task)
from env.tasks.multi_task.humanoid_traj_sit_carry_climb import HumanoidTrajSitCarryClimb  # noqa: F401
from env.tasks.vec_task_wrappers import VecTaskPythonWrapper

import numpy as np

TASKS = {"HumanoidTraj": HumanoidTraj, "HumanoidTrajSitCarryClimb": HumanoidTrajSitCarryClimb}


def parse_task(args, cfg, cfg_train, sim_params):
    cfg["seed"] = cfg_train.get("seed", -1)
    cfg["env"]["seed"] = cfg["seed"]
    if args.task not in TASKS:
        raise Exception("Unrecognized task %r: one of %s" % (args.task, ", ".join(TASKS)))
    task = TASKS[args.task](cfg=cfg, sim_params=sim_params, physics_engine=args.physics_engine,
                            device_type=args.device, device_id=args.device_id, headless=args.headless)
    env = VecTaskPythonWrapper(task, args.rl_device, cfg_train.get("clip_observations", np.inf),
                               cfg_train.get("clip_actions", 1.0))
    return task, env
