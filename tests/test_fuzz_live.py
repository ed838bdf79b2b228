"""Fuzzing a live relay: a real relay subprocess, the real wandb SDK against the fake W&B server,
a well-behaved trainer process logging a run, and two attackers on raw ZeroMQ sockets.

- Attacker 1 sends thousands of hypothesis-drawn frames (random bytes, random msgpack, valid
  frames broken byte by byte and field by field, valid messages) over one DEALER socket.
- Attacker 2 sends messages of several frames, frames over max_frame_bytes, a frame over
  ZMQ_MAXMSGSIZE (ZeroMQ drops that connection), and opens a hundred connections at once.

Afterwards the relay is alive and answers, the trainer's rows are in W&B exactly once, in
order, bit for bit, and the relay's counters are exactly what its own spool code makes of
attacker 1's frames (replayed through classify() and a scratch Spool in the same order).
Attacker 1's valid records are given the run id `evil`, so they never touch the trainer's run.
"""
from __future__ import annotations

import time

import msgpack
import pytest
import zmq
from fuzzing import (
    fuzz_settings,
    hostile_values,
    mutated_frames,
    mutated_messages,
    pack,
    valid_messages,
)
from hypothesis import given
from hypothesis import strategies as st
from test_e2e import assert_history

from relay import protocol
from relay.config import RelayConfig
from relay.server import classify
from relay.spool import Spool

pytestmark = pytest.mark.timeout(300)

ATTACK_RUN = "evil"
ATTACK_STREAM = "evil-stream"
TRAINER_RUN = "fuzztrainer"
FRAMES_PER_EXAMPLE = 60

FRAMES = st.one_of(
    st.binary(max_size=120),
    hostile_values(max_leaves=20).map(pack),
    mutated_frames(),
    mutated_messages().map(pack),
    valid_messages().map(pack),
)


def attacker_frame(frame: bytes, seqs: dict) -> bytes:
    """Valid records are moved to the attacker's own run and stream, in sequence, so that they
    are spooled and uploaded (W&B gets odd but valid data); everything else goes out as drawn."""
    try:
        message = protocol.decode(frame)
    except protocol.ProtocolError:
        return frame
    if message["t"] == "heartbeat":
        message["runs"] = [ATTACK_RUN]
    if message["t"] in protocol.RECORD_KINDS:
        seqs[ATTACK_STREAM] = seqs.get(ATTACK_STREAM, 0) + 1
        message.update(run=ATTACK_RUN, stream=ATTACK_STREAM, seq=seqs[ATTACK_STREAM])
    return protocol.encode(message)


def dealer(endpoint: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


class Replies:
    """Everything the relay sends one socket, read as it comes."""

    def __init__(self, sock: zmq.Socket):
        self.sock = sock
        self.kinds: dict[str, int] = {}
        self.last_status: dict | None = None

    def drain(self) -> None:
        while self.sock.poll(0, zmq.POLLIN):
            self._take(self.sock.recv())

    def wait_status(self, seen: int, timeout: float = 60.0) -> dict:
        """Read until the relay has sent more than `seen` status replies; return the last one."""
        deadline = time.monotonic() + timeout
        while self.kinds.get("status", 0) <= seen:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "no status reply within %.0f s (got %s)" % (timeout, self.kinds)
            if self.sock.poll(int(remaining * 1000), zmq.POLLIN):
                self._take(self.sock.recv())
        return self.last_status

    def wait_reply_to(self, stream: str, timeout: float = 60.0) -> dict:
        """Read until the relay answers the status request of `stream`; return that reply."""
        deadline = time.monotonic() + timeout
        while self.last_status is None or self.last_status.get("stream") != stream:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "no reply to status request %s within %.0f s (got %s)" % (stream, timeout, self.kinds)
            if self.sock.poll(int(remaining * 1000), zmq.POLLIN):
                self._take(self.sock.recv())
        return self.last_status

    def _take(self, raw: bytes) -> None:
        reply = msgpack.unpackb(raw, raw=False)
        self.kinds[reply["t"]] = self.kinds.get(reply["t"], 0) + 1
        if reply["t"] == "status":
            self.last_status = reply


def status_frame(stream: str) -> bytes:
    return protocol.encode({"v": protocol.VERSION, "t": "status", "stream": stream, "seq": 0})


def expected_outcomes(frames: list[bytes], spool_dir: str) -> dict[str, int]:
    """What the relay's own code makes of these frames, in this order, from an empty spool."""
    config = RelayConfig(spool_dir=spool_dir)  # the relay under test runs with no artifact root either
    counts = {"unreadable": 0, "status": 0, "heartbeat": 0}
    items = []
    for frame in frames:
        try:
            message, refusal = classify(frame, config)
        except protocol.ProtocolError:
            counts["unreadable"] += 1
            continue
        if message["t"] in protocol.UNSPOOLED_KINDS:
            counts[message["t"]] += 1
            continue
        items.append((message, refusal))
    spool = Spool(spool_dir)
    spool.load_watermarks()
    for outcome in spool.ingest(items):
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    spool.close()
    return counts


def test_relay_survives_hostile_clients_and_delivers_the_trainer_exactly(fake_wandb, relay_factory,
                                                                        trainer_factory, tmp_path):
    relay = relay_factory(fake_wandb, ["--mode", "online"])
    steps, metrics, seed = 400, 12, 5
    trainer = trainer_factory({"endpoint": relay.endpoint, "run_id": TRAINER_RUN, "steps": steps,
                               "metrics": metrics, "seed": seed, "interval": 0.01, "heartbeat_every": 1.0})

    # -- attacker 1: hypothesis-drawn frames on one socket -----------------------------------------
    attacker = dealer(relay.endpoint)
    replies = Replies(attacker)
    sent: list[bytes] = []
    seqs: dict[str, int] = {}

    @fuzz_settings(2.0 / FRAMES_PER_EXAMPLE)  # 50 x 60 = 3,000 frames at the default 1,500
    @given(st.lists(FRAMES, min_size=FRAMES_PER_EXAMPLE, max_size=FRAMES_PER_EXAMPLE))
    def attack(frames):
        for frame in frames:
            frame = attacker_frame(frame, seqs)
            attacker.send(frame)
            sent.append(frame)
        replies.drain()
        assert relay.proc.poll() is None, "relay died:\n" + relay.log()

    attack()

    # -- attacker 2: several frames per message, oversized frames, many connections ----------------
    rough = dealer(relay.endpoint)
    rough_replies = Replies(rough)
    multipart = [[b"a", b"b"], [b"", status_frame("rough")], [b"x"] * 50]
    for parts in multipart:
        rough.send_multipart(parts)
    over_limit = pack({"v": 1, "t": "log", "stream": "rough", "seq": 1, "run": "r", "metrics": {"x": "y" * 60000},
                       "pad": ["z" * 60000] * 20})  # 1.2 MB: over max_frame_bytes, under ZMQ_MAXMSGSIZE
    assert protocol.MAX_FRAME_BYTES < len(over_limit) < 2 * protocol.MAX_FRAME_BYTES
    rough.send(over_limit)
    rough.send(status_frame("rough"))
    rough_replies.wait_status(0)
    assert rough_replies.kinds == {"error": len(multipart) + 1, "status": 1}, rough_replies.kinds

    crowd = [dealer(relay.endpoint) for _ in range(100)]
    for sock in crowd:
        sock.send_multipart([b"two", b"parts"])
        sock.send(status_frame("crowd"))
    for sock in crowd:
        crowd_replies = Replies(sock)
        crowd_replies.wait_status(0)
        assert crowd_replies.kinds == {"error": 1, "status": 1}, crowd_replies.kinds
        sock.close()

    rough.send(b"\x00" * (2 * protocol.MAX_FRAME_BYTES + 1))  # ZeroMQ cuts this connection off
    # The DEALER reconnects by itself; ask until the relay answers this socket again.
    deadline = time.monotonic() + 30
    answered = 1
    while rough_replies.kinds.get("status", 0) < answered + 1:
        assert time.monotonic() < deadline, "the relay never answered the socket that sent an oversized frame"
        rough.send(status_frame("rough"))
        if rough.poll(500, zmq.POLLIN):
            rough_replies.drain()
    rough.close()

    # -- the relay has taken everything attacker 1 sent: it answers the status request sent last ---
    attacker.send(status_frame("attacker-last"))   # the relay answers a client's last request of a batch
    replies.drain()
    expected = expected_outcomes(sent, str(tmp_path / "model-spool"))
    final = replies.wait_reply_to("attacker-last")
    attacker.close()

    # -- the trainer's run: every row once, in order, bit for bit ----------------------------------
    done = trainer.event("finished")
    assert done["report"]["delivered"] is True and done["stats"]["errors"] == 0, done
    fake_wandb.wait_for(lambda: fake_wandb.complete(TRAINER_RUN), 120)
    assert_history(fake_wandb.run(TRAINER_RUN).history, seed=seed, steps=steps, metrics=metrics)

    # -- the relay is alive, and its counters are what its own code makes of the attack -----------
    assert relay.proc.poll() is None
    counters = relay.status()["counters"]
    multipart_total = len(multipart) + len(crowd)
    assert counters["malformed"] == expected["unreadable"] + multipart_total + 1, (counters, expected)
    assert counters.get("refused", 0) == expected.get("error", 0), (counters, expected)
    assert counters.get("out_of_order", 0) == expected.get("gap", 0), (counters, expected)
    assert counters["received"] == expected.get("new", 0) + steps + 2, (counters, expected)  # + open, finish
    assert counters.get("duplicates", 0) >= expected.get("dup", 0)
    assert replies.kinds["error"] == expected["unreadable"] + expected.get("error", 0), (replies.kinds, expected)
    assert final["counters"]["malformed"] >= expected["unreadable"]
    assert len(sent) >= 10 * FRAMES_PER_EXAMPLE and expected["unreadable"] + expected.get("error", 0) >= len(sent) // 2
    # The attacker's valid records (odd names, NaN, nested config, finish and resume) reach W&B
    # too, without failing the uploader.
    status = relay.wait_status(lambda s: all(run["unsent"] == 0 for run in s["runs"]), 120,
                               "every spooled record handed to W&B")
    runs = {run["run_id"]: run for run in status["runs"]}
    assert runs[TRAINER_RUN]["received"] == steps + 2
    assert set(runs) == ({TRAINER_RUN, ATTACK_RUN} if expected.get("new") else {TRAINER_RUN})
    assert all(run["state"] != "failed" and run["last_error"] is None for run in runs.values()), runs
    log = relay.log()
    assert "Traceback" not in log
    lines = [line for line in log.splitlines() if line]  # client-sent text is quoted: no forged lines
    assert all(line.startswith("20") for line in lines), [line for line in lines if not line.startswith("20")][:5]
    assert relay.stop() == 0
