"""Media in `run.log`: images, videos, audio and HTML by path, and histograms.

    run.log({"eval/reward": 3.1, "eval/episode": relay.Video("/out/ep.mp4", fps=30),
             "eval/actions": relay.Histogram(actions)}, frame=frame, epoch=epoch)

A call that holds media is split by the client into its `log` record (the scalars and axes) and a
`media` record of the rest, whose `joins` names the `log` record's seq: the relay puts both in one
W&B row, and a relay too old for `media` records refuses only those, never the scalars.

Files are sent by path, never by content: the relay reads them under its artifact roots (the same
checks as checkpoints: regular files inside a root, no `..` or symlink out, at most
`max_media_bytes`) and copies them into its spool when it takes the record, so the trainer may
write over a path once the record is acked (after `flush`, or soon after). The client stats the
file when it is logged: a file that is not there is left out of the row (the rest of the row goes
on), with an error in `client.errors` and a warning, and a file changed between the log and the
relay's copy is refused by the relay.

The wire items of a `media` record's `values`, and `check_values`, the relay's check of them:

    {"type": "image"|"video"|"audio"|"html", "path": absolute str, "stat": {"size", "mtime_ns"},
     "caption"?: str, "fps"?: number}
    {"type": "histogram", "counts": [int >= 0, ...], "edges": [float, ...]}   (1..512 bins,
     len(edges) == len(counts) + 1, edges finite and increasing)

Standard library only (Python 3.8); histograms are binned by relay.histogram.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Tuple

from relay.errors import ProtocolError, RelayError
from relay.histogram import MAX_BINS, bin_values

FILE_TYPES = ("image", "video", "audio", "html")
TYPES = FILE_TYPES + ("histogram",)
VIDEO_FORMATS = (".gif", ".mp4", ".webm", ".ogg")   # what wandb.Video takes from a path


class MediaError(RelayError, ValueError):
    """A media value that cannot be logged (its file is missing, of the wrong kind); the message says why."""


class Media(object):
    """A value of `run.log` that is not a scalar: turned into its wire item when logged."""

    def wire_item(self) -> Dict[str, Any]:
        raise NotImplementedError


class _File(Media):
    kind = ""

    def __init__(self, path: str, caption: Optional[str] = None):
        self.path = os.path.abspath(os.fspath(path))
        self.caption = None if caption is None else str(caption)

    def wire_item(self) -> Dict[str, Any]:
        """The wire item, with the file's size and mtime now; MediaError if it is not a file."""
        try:
            info = os.stat(self.path)
        except OSError as exc:
            raise MediaError("%s %s cannot be logged: %s" % (self.kind, self.path, exc.strerror))
        if not os.path.isfile(self.path):
            raise MediaError("%s %s cannot be logged: not a regular file" % (self.kind, self.path))
        item = {"type": self.kind, "path": self.path, "stat": {"size": info.st_size, "mtime_ns": info.st_mtime_ns}}
        if self.caption is not None:
            item["caption"] = self.caption
        return item

    def __repr__(self) -> str:
        return "relay.%s(%r)" % (type(self).__name__, self.path)


class Image(_File):
    """An image file (any format Pillow reads: PNG, JPEG, GIF, ...), shown as wandb.Image."""
    kind = "image"


class Audio(_File):
    """An audio file (WAV, MP3, ...), shown as wandb.Audio."""
    kind = "audio"


class Html(_File):
    """An HTML file (its name ends in .html), shown as wandb.Html."""
    kind = "html"

    def __init__(self, path: str):
        super().__init__(path)

    def wire_item(self) -> Dict[str, Any]:
        if not self.path.endswith(".html"):
            raise MediaError("html %s cannot be logged: W&B takes HTML files whose name ends in .html" % self.path)
        return super().wire_item()


class Video(_File):
    """A video file (.gif, .mp4, .webm or .ogg), shown as wandb.Video."""
    kind = "video"

    def __init__(self, path: str, caption: Optional[str] = None, fps: Optional[float] = None):
        super().__init__(path, caption)
        self.fps = fps

    def wire_item(self) -> Dict[str, Any]:
        if os.path.splitext(self.path)[1].lower() not in VIDEO_FORMATS:
            raise MediaError("video %s cannot be logged: W&B takes %s video files"
                             % (self.path, ", ".join(VIDEO_FORMATS)))
        item = super().wire_item()
        if self.fps is not None:
            item["fps"] = float(self.fps)
        return item


class Histogram(Media):
    """A histogram of `values` (a list, numpy array or torch tensor), binned now (relay.histogram)
    into `bins` equal bins (at most 512), shown as wandb.Histogram."""

    def __init__(self, values: Any, bins: int = 64):
        self.counts, self.edges = bin_values(values, bins)

    @classmethod
    def of_bins(cls, counts: List[int], edges: List[float]) -> "Histogram":
        """A histogram binned already (relay.histogram.bin_many)."""
        made = cls.__new__(cls)
        made.counts, made.edges = list(counts), list(edges)
        return made

    def wire_item(self) -> Dict[str, Any]:
        return {"type": "histogram", "counts": self.counts, "edges": self.edges}

    def __repr__(self) -> str:
        return "relay.Histogram(%d bins)" % len(self.counts)


def split(values: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any], List[str]]:
    """Split `run.log`'s values into (scalars, media items, problems): a media value whose item
    cannot be made is left out, and its problem returned."""
    scalars, items, problems = {}, {}, []
    for name, value in values.items():
        if not isinstance(value, Media):
            scalars[name] = value
            continue
        try:
            items[name] = value.wire_item()
        except MediaError as exc:
            problems.append("%s: %s" % (name, exc))
    return scalars, items, problems


def holds_media(values: Dict[str, Any]) -> bool:
    return any(isinstance(value, Media) for value in values.values())


# -- the relay's check of a media record's values (relay.protocol.validate) --------------------

def check_values(values: Dict[str, Any]) -> None:
    """Raise ProtocolError naming the first item that is not a valid wire item."""
    if not values:
        raise ProtocolError("field 'values' of a media record is empty")
    for name, item in values.items():
        where = "values[%r]" % name
        if not isinstance(item, dict) or item.get("type") not in TYPES:
            raise ProtocolError("%s must be a map with 'type' one of %s" % (where, ", ".join(TYPES)))
        if item["type"] == "histogram":
            _check_histogram(item, where)
        else:
            _check_file(item, where)


def _check_file(item: Dict[str, Any], where: str) -> None:
    allowed = {"type", "path", "stat", "caption", "fps"}
    if set(item) - allowed:
        raise ProtocolError("%s has unknown fields %s" % (where, ", ".join(sorted(repr(k) for k in set(item) - allowed))))
    path = item.get("path")
    if not isinstance(path, str) or not path.startswith("/") or not path.isprintable():
        raise ProtocolError("%s.path must be an absolute path without control characters" % where)
    seen = item.get("stat")
    if not (isinstance(seen, dict) and set(seen) == {"size", "mtime_ns"}
            and all(isinstance(v, int) and not isinstance(v, bool) for v in seen.values())):
        raise ProtocolError("%s.stat must be {size: int, mtime_ns: int}" % where)
    if item.get("caption") is not None and not isinstance(item["caption"], str):
        raise ProtocolError("%s.caption must be a string" % where)
    fps = item.get("fps")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float))
                            or not 0 < fps < 1e6 or item["type"] != "video"):
        raise ProtocolError("%s.fps must be a positive number, and only a video has one" % where)


def _check_histogram(item: Dict[str, Any], where: str) -> None:
    if set(item) != {"type", "counts", "edges"}:
        raise ProtocolError("%s must have exactly the fields type, counts, edges" % where)
    counts, edges = item["counts"], item["edges"]
    if not isinstance(counts, list) or not 1 <= len(counts) <= MAX_BINS or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        raise ProtocolError("%s.counts must be 1..%d ints >= 0" % (where, MAX_BINS))
    if not isinstance(edges, list) or len(edges) != len(counts) + 1 or not all(
            isinstance(e, (int, float)) and not isinstance(e, bool) and math.isfinite(e) for e in edges):
        raise ProtocolError("%s.edges must be len(counts) + 1 finite numbers" % where)
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise ProtocolError("%s.edges must be increasing" % where)
