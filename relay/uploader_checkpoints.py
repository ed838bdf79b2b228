"""A run's checkpoints as W&B model artifacts, for its uploader (relay/uploader.py): each logged
from the snapshot the relay took when it took the record (relay/snapshots.py), and its record let
go of, snapshot and all, once W&B has committed the artifact, or at once when the snapshot cannot
be read (the error is logged: the run goes on without that checkpoint).
"""
from __future__ import annotations

import logging
import os

from relay.config import RelayConfig
from relay.sinks.wandb import ArtifactWatch, WandbSink
from relay.snapshots import open_snapshot
from relay.spool_uploads import Record, Uploads

log = logging.getLogger("relay.uploader")  # part of the uploader's log, as operators read it


class Checkpoints:
    """A run's checkpoints as W&B model artifacts: each logged from its snapshot, and let go of once
    W&B committed its artifact (or at once, when its snapshot cannot be read)."""

    def __init__(self, run_id: str, config: RelayConfig, uploads: Uploads, sink: WandbSink):
        self.run_id = run_id
        self.config = config
        self._uploads = uploads
        self._sink = sink
        self._artifacts = ArtifactWatch(run_id)  # checkpoints logged, until W&B commits them

    def let_go_committed(self) -> None:
        """Let go of the checkpoint records whose artifacts W&B has committed, snapshots and all."""
        for record_id in self._artifacts.committed():
            self._uploads.confirm_checkpoint(self.run_id, record_id)

    def log(self, record: Record) -> None:
        """Log the checkpoint's snapshot, taken when the relay took the record (relay/snapshots.py)."""
        body = record.body
        try:
            fd = open_snapshot(self.config.spool_dir, body)
        except OSError as exc:
            log.error("checkpoint %s of run %s (seq %d) is not uploaded: its snapshot in the spool cannot be read "
                      "(%s); the record is let go", body["path"], self.run_id, body["seq"], exc)
            self._uploads.confirm_checkpoint(self.run_id, record.id)
            return
        logged = self._sink.log_checkpoint(fd, os.path.basename(body["path"]), body.get("metadata") or {},
                                           body.get("aliases") or None)
        self._artifacts.watch(record.id, logged, body["path"])
        log.info("run %s: checkpoint %s logged as a model artifact", self.run_id, body["path"])

