import torch
import torch.nn as nn

from learning import amp_network_builder


class AMPTransformerMultiTaskBuilder(amp_network_builder.AMPBuilder):
    """The AMP network with a small token mixer over (self obs, task code) feeding the actor, and a
    'compensate composer' layer whose weights the trans agent regularises (`transformer:` in the yaml)."""

    class Network(amp_network_builder.AMPBuilder.Network):
        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)
            obs_size = kwargs['input_shape'][0]
            features = params['transformer']['num_features']
            self._tokenizer = nn.Linear(obs_size, features)
            self._compensate_composer = nn.Linear(features, kwargs['actions_num'])

        def forward(self, obs_dict):
            mu, sigma, value, states = super().forward(obs_dict)
            mu = mu + self._compensate_composer(torch.relu(self._tokenizer(obs_dict['obs'])))
            return mu, sigma, value, states

        def get_compensate_composer_parameters(self):
            return [torch.flatten(p) for p in self._compensate_composer.parameters()]
