from rl_games.algos_torch.models import ModelA2CContinuousLogStd


class ModelAMPContinuous(ModelA2CContinuousLogStd):
    def build(self, config):
        return ModelAMPContinuous.Network(self.network_builder.build('amp', **config))

    class Network(ModelA2CContinuousLogStd.Network):
        def forward(self, input_dict):
            result = super().forward(input_dict)
            if input_dict.get('is_train', True):
                disc = self.a2c_network.eval_disc
                result["disc_agent_logit"] = disc(input_dict['amp_obs'])
                result["disc_agent_replay_logit"] = disc(input_dict['amp_obs_replay'])
                result["disc_demo_logit"] = disc(input_dict['amp_obs_demo'])
            return result
