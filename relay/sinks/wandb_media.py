"""Media items of a row (relay/planner.py MediaValue) as the wandb SDK's media objects.

Files are read from the copies the relay took when it took the record (relay/mediafiles.py), never
from the trainer's path; wandb copies each into the run's media directory when the row is logged,
and uploads it from there. Histograms arrive binned: `wandb.Histogram(np_histogram=(counts, edges))`.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import wandb

from relay import mediafiles
from relay.planner import MediaValue

log = logging.getLogger("relay.uploader")


def wandb_value(value: MediaValue, spool_dir: str) -> Any:
    """The wandb object for one media item; raises OSError when its copy cannot be read, ValueError
    (or what wandb raises) when wandb refuses the file."""
    item = value.item
    if item["type"] == "histogram":
        return wandb.Histogram(np_histogram=(item["counts"], item["edges"]))
    path = mediafiles.item_path(spool_dir, {"stream": value.stream, "seq": value.seq}, value.index, item)
    if not os.path.isfile(path):
        raise FileNotFoundError("its copy %s is not in the spool" % path)
    caption = item.get("caption")
    if item["type"] == "image":
        return wandb.Image(path, caption=caption)
    if item["type"] == "video":
        return wandb.Video(path, caption=caption)
    if item["type"] == "audio":
        return wandb.Audio(path, caption=caption)
    return wandb.Html(path)


def row_with_media(run_id: str, values: dict, spool_dir: str) -> dict:
    """The row with its MediaValues made wandb objects; an item that cannot be made is left out of
    the row (logged as an error: the rest of the row goes on)."""
    row = {}
    for name, value in values.items():
        if not isinstance(value, MediaValue):
            row[name] = value
            continue
        try:
            row[name] = wandb_value(value, spool_dir)
        except Exception as exc:  # wandb raises its own types for a file it cannot read
            log.error("run %s: media %s (%s %s, record seq %d) is left out of its row: %s: %s", run_id, name,
                      value.item["type"], value.item.get("path", ""), value.seq, type(exc).__name__, exc)
    return row
