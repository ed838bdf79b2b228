"""Media through the relay: images, videos, audio and HTML by path, copied into the spool when the
relay takes the record and logged as wandb media in the row of the scalars logged with them;
histograms binned on the trainer. Real relay subprocess, real wandb SDK, fake W&B, real files."""
from __future__ import annotations

import hashlib
import io
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
