import torch
import torch.nn as nn
from rl_games.algos_torch import network_builder


class AMPBuilder(network_builder.A2CBuilder):
    """rl_games' actor-critic MLP plus a discriminator MLP over AMP observations (`disc:` in the yaml)."""

    class Network(network_builder.A2CBuilder.Network):
        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)
            if self.is_continuous and not self.space_config['learn_sigma']:
                self.sigma.requires_grad_(False)
            disc_in = kwargs['amp_input_shape'][0]
            self._disc_mlp = self._build_mlp(input_size=disc_in, units=self._disc_units,
                                             activation=self._disc_activation, dense_func=nn.Linear)
            self._disc_logits = nn.Linear(self._disc_units[-1], 1)
            init = self.init_factory.create(**self._disc_initializer)
            for m in self._disc_mlp.modules():
                if isinstance(m, nn.Linear):
                    init(m.weight)
                    nn.init.zeros_(m.bias)
            nn.init.uniform_(self._disc_logits.weight, -1.0, 1.0)
            nn.init.zeros_(self._disc_logits.bias)

        def load(self, params):
            super().load(params)
            self._disc_units = params['disc']['units']
            self._disc_activation = params['disc']['activation']
            self._disc_initializer = params['disc']['initializer']

        def eval_critic(self, obs):
            return self.value_act(self.value(self.critic_mlp(obs)))

        def eval_disc(self, amp_obs):
            return self._disc_logits(self._disc_mlp(amp_obs))

        def get_disc_logit_weights(self):
            return torch.flatten(self._disc_logits.weight)

        def get_disc_weights(self):
            weights = [torch.flatten(m.weight) for m in self._disc_mlp.modules() if isinstance(m, nn.Linear)]
            return weights + [torch.flatten(self._disc_logits.weight)]

    def build(self, name, **kwargs):
        return self.Network(self.params, **kwargs)
