import torch
from rl_games.algos_torch import torch_ext

import learning.amp_agent as amp_agent


class TransAgent(amp_agent.AMPAgent):
    """The multi-task agent: AMP plus an L2 penalty on the network's compensate composer
    (reg_loss_enabled, reg_loss_coef), logged as losses/compensate_composer_reg_loss."""

    def _load_config_params(self, config):
        super()._load_config_params(config)
        self._reg_loss_coef = config.get('reg_loss_coef', 0.0)
        self._reg_loss_enabled = config.get('reg_loss_enabled', False)

    def _build_net_config(self):
        config = super()._build_net_config()
        config["hrl_checkpoint"] = self.config.get("hrl_checkpoint", "")
        config["device"] = self.ppo_device
        return config

    def _extra_losses(self, batch_dict, res_dict):
        loss, info = super()._extra_losses(batch_dict, res_dict)
        if self._reg_loss_enabled:
            params = self.model.a2c_network.get_compensate_composer_parameters()
            reg_loss = torch.sum(torch.square(torch.cat(params, dim=-1))) * self._reg_loss_coef
            loss = loss + reg_loss
            info['reg_loss'] = reg_loss.detach()
        return loss, info

    def _log_train_info(self, train_info, frame):
        super()._log_train_info(train_info, frame)
        if self._reg_loss_enabled:
            self.writer.add_scalar('losses/compensate_composer_reg_loss',
                                   torch_ext.mean_list(train_info['reg_loss']).item(), frame)
