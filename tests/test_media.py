"""Media through the relay: images, videos, audio and HTML by path, copied into the spool when the
relay takes the record and logged as wandb media in the row of the scalars logged with them;
histograms binned on the trainer. Real relay subprocess, real wandb SDK, fake W&B, real files."""
from __future__ import annotations

import hashlib
import io
import math
import os
import wave

import pytest

import relay as relay_api
from relay import histogram, media, planner, protocol
from relay.client import RelayClient

pytestmark = pytest.mark.timeout(240)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def png(color: tuple) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(out, format="PNG")
    return out.getvalue()


def gif() -> bytes:
    from PIL import Image

    frames = [Image.new("RGB", (4, 4), (40 * i, 0, 0)) for i in range(3)]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return out.getvalue()


def wav() -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as sound:
        sound.setnchannels(1)
        sound.setsampwidth(2)
        sound.setframerate(8000)
        sound.writeframes(bytes(range(256)) * 8)
    return out.getvalue()


def snapshot_entries(relay) -> list[str]:
    directory = os.path.join(relay.spool_dir, "snapshots")
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def test_media_by_path_arrive_in_the_row_of_their_scalars_as_they_were_logged(fake_wandb, relay_factory, tmp_path):
    torch = pytest.importorskip("torch")
    numpy = pytest.importorskip("numpy")
    root = tmp_path / "output"
    root.mkdir()
    files = {"picture.png": png((200, 10, 10)), "episode.gif": gif(), "sound.wav": wav(),
             "page.html": b"<html><body><h1>eval</h1></body></html>"}
    for name, data in files.items():
        (root / name).write_bytes(data)
    (tmp_path / "secret.png").write_bytes(png((1, 2, 3)))
    os.symlink(tmp_path / "secret.png", root / "link.png")
    (root / "big.png").write_bytes(b"\0" * 200_000)
    relay = relay_factory(fake_wandb, ["--mode", "online", "--artifact-root", str(root)],
                          env={"RELAY_MAX_MEDIA_BYTES": "100000"})
    client = RelayClient(relay.endpoint, spill_dir=str(tmp_path / "spill"))
    run = client.start_run(project="tokenHSI", run_id="media")
    actions = torch.tensor([[0.5, -1.0, 2.0], [3.25, 0.0, -0.75]])
    run.log({"eval/reward": 1.5, "eval/picture": relay_api.Image(str(root / "picture.png"), caption="episode 1"),
             "eval/episode": relay_api.Video(str(root / "episode.gif"), fps=4),
             "eval/sound": relay_api.Audio(str(root / "sound.wav")), "eval/page": relay_api.Html(str(root / "page.html")),
             "eval/actions": relay_api.Histogram(actions, bins=5)}, frame=1000, epoch=1)
    assert client.flush(30)
    (root / "picture.png").write_bytes(png((0, 0, 250)))           # the next evaluation writes over it
    assert len(snapshot_entries(relay)) == 1                       # the record's copies, one directory
    relay.wait_status(lambda s: snapshot_entries(relay) == [], 60,
                      "the copies deleted mid-run, once W&B counted the row")
    run.log({"eval/reward": 2.5, "eval/picture": relay_api.Image(str(root / "picture.png"))}, frame=2000, epoch=2)
    run.log({"x": 3.0, "out": relay_api.Image(str(root / ".." / "secret.png"))}, frame=3000)
    run.log({"x": 4.0, "link": relay_api.Image(str(root / "link.png"))}, frame=4000)
    run.log({"x": 5.0, "big": relay_api.Image(str(root / "big.png"))}, frame=5000)
    run.log({"x": 6.0, "gone": relay_api.Image(str(root / "missing.png"))}, frame=6000)
    report = run.finish(exit_code=0, timeout=30)
    stats = client.statistics()
    client.close()
    assert report["delivered"] is True
    errors = client.errors
    assert len(errors) == 4, errors
    assert errors[0] == ("run media: gone: image %s cannot be logged: No such file or directory; the rest of the "
                         "row is logged" % (root / "missing.png"))
    assert "media file %s refused: it resolves to %s, outside every artifact root" % (
        tmp_path / "secret.png", tmp_path / "secret.png") in errors[1]
    assert "media file %s refused: it resolves to %s, outside every artifact root" % (
        root / "link.png", tmp_path / "secret.png") in errors[2]
    assert "media file %s refused: 200000 bytes is over the 100000-byte limit (max_media_bytes)" % (
        root / "big.png") in errors[3]
    assert stats["errors"] == 3, stats

    fake_wandb.wait_for(lambda: fake_wandb.complete("media"), 120)
    fake_run = fake_wandb.run("media")
    rows = fake_run.history
    assert [(row["_step"], row.get("frame"), row.get("eval/reward", row.get("x"))) for row in rows] == [
        (0, 1000, 1.5), (1, 2000, 2.5), (2, 3000, 3.0), (3, 4000, 4.0), (4, 5000, 5.0), (5, 6000, 6.0)]
    assert [sorted(key for key in row if not key.startswith("_")) for row in rows[2:]] == [["frame", "x"]] * 4
    first, second = rows[0], rows[1]
    uploaded = {key: fake_run.files[first[key]["path"]] for key in ("eval/picture", "eval/episode", "eval/sound")}
    assert {key: sha(data) for key, data in uploaded.items()} == {
        "eval/picture": sha(files["picture.png"]), "eval/episode": sha(files["episode.gif"]),
        "eval/sound": sha(files["sound.wav"])}
    assert sha(fake_run.files[second["eval/picture"]["path"]]) == sha(png((0, 0, 250)))
    assert (first["eval/picture"]["_type"], first["eval/picture"]["caption"], first["eval/picture"]["width"],
            first["eval/picture"]["height"]) == ("image-file", "episode 1", 8, 6)
    assert (first["eval/episode"]["_type"], first["eval/sound"]["_type"], first["eval/page"]["_type"]) == (
        "video-file", "audio-file", "html-file")
    assert b"<h1>eval</h1>" in fake_run.files[first["eval/page"]["path"]]
    counts, edges = numpy.histogram(actions.numpy().astype(numpy.float64), bins=5)
    assert first["eval/actions"] == {"_type": "histogram", "values": counts.tolist(), "bins": edges.tolist()}
    relay.wait_status(lambda s: s["runs"][0]["finished"] and snapshot_entries(relay) == [], 30,
                      "the run finished and its media copies deleted")
    assert "ERROR" not in relay.log(), relay.log()
    assert relay.stop() == 0


def test_histograms_bin_as_numpy_does_from_lists_arrays_and_tensors_in_python_too():
    numpy = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    rng = numpy.random.default_rng(14)
    samples = [rng.normal(size=1000), numpy.arange(-8, 9) / 4.0, numpy.full(7, 2.5), numpy.array([]),
               numpy.array([1.0, numpy.nan, numpy.inf, -numpy.inf, 3.0])]
    for values in samples:
        for bins in (1, 7, 64, 512):
            finite = values[numpy.isfinite(values)]
            counts, edges = numpy.histogram(finite, bins=bins)
            expected = (counts.tolist(), edges.tolist())
            assert histogram.bin_values(values, bins) == expected
            assert histogram.bin_values(values.tolist(), bins) == expected
            assert histogram.bin_values(torch.from_numpy(values), bins) == expected
            assert histogram._bin_in_python(values.tolist(), bins) == expected, (values, bins)
    # the binning a device tensor gets (there, then one copy), run here on the CPU: numpy's bins for
    # values off the edges, and bin_many's split of the one transfer
    values = torch.from_numpy(rng.normal(size=999))
    counts, edges = numpy.histogram(values.numpy(), bins=33)
    assert histogram._from_parts(histogram._device_parts(torch, values, 33).tolist(), 33) == (
        counts.tolist(), edges.tolist())
    for odd in ([2.5] * 5, [1.0, math.nan, 3.0, -math.inf], [math.nan], []):
        assert histogram._from_parts(histogram._device_parts(torch, torch.tensor(odd, dtype=torch.float64), 4)
                                     .tolist(), 4) == histogram.bin_values(odd, 4), odd
    assert histogram.bin_many({"a": values, "b": [1.0, 2.0]}, bins=33) == {
        "a": (counts.tolist(), edges.tolist()), "b": histogram.bin_values([1.0, 2.0], 33)}
    for bad in (0, 513, 2.0, True):
        with pytest.raises(ValueError, match="bins must be an int from 1 to 512"):
            relay_api.Histogram([1.0], bins=bad)


def test_media_records_are_checked_item_by_item():
    image = {"type": "image", "path": "/out/a.png", "stat": {"size": 3, "mtime_ns": 4}, "caption": "c"}
    curve = {"type": "histogram", "counts": [1, 2], "edges": [0.0, 0.5, 1.0]}
    base = {"v": 1, "t": "media", "stream": "s", "seq": 2, "run": "r", "time": 1.0, "joins": 1, "frame": 8}
    protocol.validate(dict(base, values={"a": image, "b": curve}))
    bad = {
        "values[%r] must be a map with 'type' one of image, video, audio, html, histogram" % "x": {"type": "pdf"},
        "values['x'].path must be an absolute path without control characters": dict(image, path="a.png"),
        "values['x'].stat must be {size: int, mtime_ns: int}": dict(image, stat={"size": 1}),
        "values['x'].fps must be a positive number, and only a video has one": dict(image, fps=4.0),
        "values['x'] has unknown fields 'data'": dict(image, data="...."),
        "values['x'].counts must be 1..512 ints >= 0": dict(curve, counts=[1, -2]),
        "values['x'].edges must be len(counts) + 1 finite numbers": dict(curve, edges=[0.0, 1.0]),
        "values['x'].edges must be increasing": dict(curve, edges=[0.0, 1.0, 1.0]),
    }
    for reason, item in bad.items():
        with pytest.raises(protocol.ProtocolError) as refused:
            protocol.validate(dict(base, values={"x": item}))
        assert refused.value.reason == reason
    with pytest.raises(protocol.ProtocolError, match="field 'joins' must be int, got str"):
        protocol.validate(dict(base, values={"a": image}, joins="1"))
    with pytest.raises(protocol.ProtocolError, match="field 'values' of a media record is empty"):
        protocol.validate(dict(base, values={}))


def test_a_video_of_another_format_or_html_without_html_name_is_left_out_with_the_reason(tmp_path):
    (tmp_path / "clip.avi").write_bytes(b"avi")
    (tmp_path / "page.htm").write_bytes(b"<p>")
    scalars, items, problems = media.split({"x": 1.0, "v": relay_api.Video(str(tmp_path / "clip.avi")),
                                            "h": relay_api.Html(str(tmp_path / "page.htm"))})
    assert (scalars, items) == ({"x": 1.0}, {})
    assert problems == ["v: video %s cannot be logged: W&B takes .gif, .mp4, .webm, .ogg video files"
                        % (tmp_path / "clip.avi"),
                        "h: html %s cannot be logged: W&B takes HTML files whose name ends in .html"
                        % (tmp_path / "page.htm")]


def test_replayed_spill_file_copies_its_media_and_refuses_a_file_changed_since_the_log(fake_wandb, relay_factory,
                                                                                      tmp_path):
    import subprocess
    import sys

    from harness import wandb_env

    root = tmp_path / "output"
    root.mkdir()
    (root / "a.png").write_bytes(png((10, 20, 30)))
    (root / "b.png").write_bytes(png((40, 50, 60)))
    relay = relay_factory(fake_wandb, ["--mode", "online", "--artifact-root", str(root)], start=False)
    client = RelayClient(relay.endpoint, spill_dir=str(tmp_path / "spill"), provenance=False, system_metrics=0)
    run = client.start_run(project="tokenHSI", run_id="spilled-media")
    run.log({"x": 1.0, "a": relay_api.Image(str(root / "a.png"))}, frame=1)
    run.log({"x": 2.0, "b": relay_api.Image(str(root / "b.png"))}, frame=2)
    report = run.finish(exit_code=0, timeout=0.5)                  # no relay: all of it goes to the spill file
    client.close()
    assert report["delivered"] is False
    (root / "a.png").write_bytes(png((70, 80, 90)) + b"later")     # the trainer wrote over it since
    relay.start()
    env = dict(wandb_env(fake_wandb, str(tmp_path / "home")), RELAY_ARTIFACT_ROOTS=str(root))
    replay = subprocess.run([sys.executable, "-m", "relay", "replay", "--spool-dir", relay.spool_dir,
                             report["spill_file"]], env=env, capture_output=True, text=True, timeout=60)
    assert replay.returncode == 1, replay.stderr
    assert "refused seq 3: media file %s refused: it changed after it was logged" % (root / "a.png") in replay.stderr
    assert "5 records new, 0 already delivered, 1 refused" in replay.stdout
    (root / "b.png").unlink()                                      # the replay's copy is what uploads
    fake_wandb.wait_for(lambda: fake_wandb.complete("spilled-media"), 120)
    fake_run = fake_wandb.run("spilled-media")
    assert [(row["x"], sorted(row)) for row in fake_run.history] == [
        (1.0, ["_runtime", "_step", "_timestamp", "frame", "x"]),
        (2.0, ["_runtime", "_step", "_timestamp", "b", "frame", "x"])]
    assert sha(fake_run.files[fake_run.history[1]["b"]["path"]]) == sha(png((40, 50, 60)))
    relay.wait_status(lambda s: s["runs"][0]["finished"] and snapshot_entries(relay) == [], 30,
                      "the run finished and its media copies deleted")
    assert relay.stop() == 0
