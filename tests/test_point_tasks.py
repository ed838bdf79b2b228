"""The built-in point tasks: shapes, determinism, and that the scripted controller solves them."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from tokenhsi.env.point_tasks import TASKS  # noqa: E402

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_shapes_and_same_seed_same_rollout(name):
    rollouts = []
    for _ in range(2):
        task = TASKS[name](num_envs=8, seed=3)
        obs = task.reset()
        assert obs.shape == (8, task.obs_dim)
        total = torch.zeros(8)
        for _ in range(50):
            obs, reward, done, info = task.step(task.scripted_actions())
            assert obs.shape == (8, task.obs_dim) and reward.shape == (8,) and done.shape == (8,)
            assert info["amp_obs"].shape == (8, task.amp_obs_dim)
            total += reward
        rollouts.append(total)
    assert torch.equal(rollouts[0], rollouts[1])


@pytest.mark.parametrize("name, threshold", [("PointTraj", 0.6), ("PointCarry", 0.6)])
def test_scripted_controller_succeeds_where_random_actions_do_not(name, threshold):
    def success_rate(policy) -> float:
        task = TASKS[name](num_envs=256, seed=5)
        task.reset()
        successes = episodes = 0
        for _ in range(task.episode_length + 5):
            _, _, done, info = task.step(policy(task))
            successes += int(info["success"].sum())
            episodes += int(done.sum())
        return successes / max(episodes, 1)

    generator = torch.Generator().manual_seed(0)
    scripted = success_rate(lambda task: task.scripted_actions())
    random_policy = success_rate(lambda task: torch.rand(task.num_envs, 2, generator=generator) * 2 - 1)
    assert scripted >= threshold > random_policy, (scripted, random_policy)


def test_multitask_reports_a_reward_per_task_and_one_hot_ids():
    task = TASKS["PointMultiTask"](num_envs=10, seed=1)
    obs = task.reset()
    assert obs[:5, -2:].tolist() == [[1.0, 0.0]] * 5 and obs[5:, -2:].tolist() == [[0.0, 1.0]] * 5
    _, _, _, info = task.step(task.scripted_actions())
    assert set(info["task_rewards"]) == {"traj", "carry"}
