"""AMP on top of rl_games' continuous A2C (PPO) agent.

A discriminator learns to tell the agent's state transitions (`info["amp_obs"]`) from those of
the reference motion (the tasks' scripted controller, played in a second copy of the task). Its
output becomes a style reward, mixed with the task reward:
    r = task_reward_w * r_task + disc_reward_w * -log(1 - sigmoid(D(s, s')))
After each PPO epoch the discriminator takes a few gradient steps (BCE with logits, plus a
gradient penalty on the reference transitions), and its statistics are written to the agent's
writer under the names TokenHSI users know (losses/disc_loss, info/disc_*).
"""
from __future__ import annotations

import torch
from rl_games.algos_torch import a2c_continuous
from torch import nn

from tokenhsi.env.point_tasks import TASKS


class Discriminator(nn.Module):
    def __init__(self, inputs: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, amp_obs: torch.Tensor) -> torch.Tensor:
        return self.net(amp_obs).squeeze(-1)


class AMPAgent(a2c_continuous.A2CAgent):
    def __init__(self, base_name, params):
        super().__init__(base_name, params)
        amp = params["config"]["amp"]
        self.task_reward_w = float(amp["task_reward_w"])
        self.disc_reward_w = float(amp["disc_reward_w"])
        self.disc_epochs = int(amp["disc_epochs"])
        self.grad_penalty_w = float(amp["grad_penalty"])
        task = self.vec_env.env.task if hasattr(self.vec_env, "env") else self.vec_env.task
        self.disc = Discriminator(task.amp_obs_dim, int(amp["disc_hidden"])).to(self.ppo_device)
        self.disc_optimizer = torch.optim.Adam(self.disc.parameters(), lr=float(amp["disc_lr"]))
        task_name = params["config"]["env_config"]["task"]
        self.reference = TASKS[task_name](self.num_actors, device=str(self.ppo_device), seed=12345)
        self.reference.reset()
        self._clip_fracs: list[torch.Tensor] = []
        self.actor_loss_func = self._counting_clips(self.actor_loss_func)
        self._agent_amp: list[torch.Tensor] = []
        self._disc_rewards: list[torch.Tensor] = []
        self._task_rewards: dict[str, list[torch.Tensor]] = {}

    def _counting_clips(self, actor_loss):
        """rl_games 1.6 does not report PPO's clip fraction (TokenHSI's info/clip_frac): measure it."""
        def actor_loss_counting_clips(old_neglogp, neglogp, advantage, is_ppo, e_clip):
            with torch.no_grad():
                ratio = torch.exp(old_neglogp - neglogp)
                self._clip_fracs.append(((ratio - 1.0).abs() > e_clip).float().mean())
            return actor_loss(old_neglogp, neglogp, advantage, is_ppo, e_clip)
        return actor_loss_counting_clips

    def env_step(self, actions):
        obs, rewards, dones, infos = super().env_step(actions)
        amp_obs = infos["amp_obs"].to(self.ppo_device)
        self._agent_amp.append(amp_obs)
        with torch.no_grad():
            probability = torch.sigmoid(self.disc(amp_obs))
            style = -torch.log(torch.clamp(1.0 - probability, min=1e-4))
        self._disc_rewards.append(style)
        for name, value in infos.get("task_rewards", {}).items():
            self._task_rewards.setdefault(name, []).append(value)
        return obs, self.task_reward_w * rewards + self.disc_reward_w * style.unsqueeze(1), dones, infos

    def _reference_amp_obs(self, count: int) -> torch.Tensor:
        batches, have = [], 0
        while have < count:
            _, _, _, info = self.reference.step(self.reference.scripted_actions())
            batches.append(info["amp_obs"])
            have += info["amp_obs"].shape[0]
        return torch.cat(batches)[:count]

    def train_epoch(self):
        result = super().train_epoch()
        agent = torch.cat(self._agent_amp)
        demo = self._reference_amp_obs(agent.shape[0])
        for _ in range(self.disc_epochs):
            demo_input = demo.clone().requires_grad_(True)
            agent_logit, demo_logit = self.disc(agent), self.disc(demo_input)
            bce = nn.functional.binary_cross_entropy_with_logits
            loss = bce(agent_logit, torch.zeros_like(agent_logit)) + bce(demo_logit, torch.ones_like(demo_logit))
            gradient = torch.autograd.grad(demo_logit.sum(), demo_input, create_graph=True)[0]
            penalty = gradient.pow(2).sum(dim=1).mean()
            self.disc_optimizer.zero_grad()
            (loss + self.grad_penalty_w * penalty).backward()
            self.disc_optimizer.step()
        rewards = torch.cat(self._disc_rewards)
        stats = {"losses/disc_loss": loss.detach(), "info/disc_agent_acc": (agent_logit < 0).float().mean(),
                 "info/disc_demo_acc": (demo_logit > 0).float().mean(), "info/disc_agent_logit": agent_logit.mean(),
                 "info/disc_demo_logit": demo_logit.mean(), "info/disc_grad_penalty": penalty.detach(),
                 "info/disc_reward_mean": rewards.mean(), "info/disc_reward_std": rewards.std()}
        if self._clip_fracs:
            stats["info/clip_frac"] = torch.stack(self._clip_fracs).mean()
        for name, values in self._task_rewards.items():
            stats["rewards/%s" % name] = torch.stack(values).mean()
        for tag, value in stats.items():
            self.writer.add_scalar(tag, value.detach(), self.frame)
        self._agent_amp.clear()
        self._disc_rewards.clear()
        self._task_rewards.clear()
        self._clip_fracs.clear()
        return result
