from env.tasks.humanoid_amp import HumanoidAMP


class HumanoidTraj(HumanoidAMP):
    """One task (reach the target), no task-specific observation."""
