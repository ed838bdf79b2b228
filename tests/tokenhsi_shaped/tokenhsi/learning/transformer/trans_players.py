import os

import learning.amp_players as amp_players


class TransPlayerContinuous(amp_players.AMPPlayerContinuous):
    """The multi-task player: as the AMP one, but --eval_task puts the metrics in a sub-folder of that name."""

    def __init__(self, config):
        self._eval_task = config["eval_task"]
        super().__init__(config)

    def _metrics_dir(self):
        save_dir = super()._metrics_dir()
        return os.path.join(save_dir, self._eval_task) if self._eval_task != "" else save_dir
