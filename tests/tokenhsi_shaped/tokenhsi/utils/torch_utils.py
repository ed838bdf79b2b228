import torch
from rl_games.algos_torch import torch_ext


def load_checkpoint(filename, device):
    print("=> loading checkpoint '{}' at device: {}".format(filename, device))
    return torch_ext.safe_filesystem_op(torch.load, filename, map_location=torch.device(device))
