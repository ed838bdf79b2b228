"""Two hosts without Docker: two network namespaces joined by a veth pair (iproute2).

The relay listens with CurveZMQ on its namespace's veth address; trainer processes in the other
namespace reach it over that link. The authorized trainer's rows arrive exactly (offline W&B run in
the relay's namespace, synced afterwards to the fake W&B server); a trainer with an unknown key and
one without keys get nothing acked. Needs root (`ip netns add`); skipped with the reason otherwise.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from harness import ROOT, wandb_env
from test_e2e import assert_history
from test_security import make_keys

pytestmark = pytest.mark.timeout(300)


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


class Link:
    """Namespaces `relay_ns` (address `relay_ip`) and `trainer_ns` (`trainer_ip`), joined by a veth pair."""

    def __init__(self):
        token = uuid.uuid4().hex[:6]
        self.relay_ns, self.trainer_ns = "rly-%s-r" % token, "rly-%s-t" % token
        self.veth = ("rv%sr" % token, "rv%st" % token)          # interface names: 15 characters at most
        subnet = "10.%d.%d" % (random.randint(200, 250), random.randint(0, 255))
        self.relay_ip, self.trainer_ip = subnet + ".1", subnet + ".2"
        self.made: list[str] = []

    def create(self) -> None:
        for ns in (self.relay_ns, self.trainer_ns):
            self._run("netns", "add", ns)
            self.made.append(ns)
        self._run("link", "add", self.veth[0], "type", "veth", "peer", "name", self.veth[1])
        for ns, veth, address in ((self.relay_ns, self.veth[0], self.relay_ip),
                                  (self.trainer_ns, self.veth[1], self.trainer_ip)):
            self._run("link", "set", veth, "netns", ns)
            self._run("-n", ns, "addr", "add", address + "/24", "dev", veth)
            self._run("-n", ns, "link", "set", veth, "up")
            self._run("-n", ns, "link", "set", "lo", "up")   # wandb talks to its own service on loopback

    def remove(self) -> None:
        for ns in self.made:  # removing a namespace removes its end of the veth pair, and so both ends
            ip("netns", "del", ns)
        if ip("link", "show", self.veth[0]).returncode == 0:
            ip("link", "del", self.veth[0])

    def exec_in(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def _run(self, *args: str) -> None:
        done = ip(*args)
        if done.returncode != 0:
            raise RuntimeError("ip %s: %s" % (" ".join(args), done.stderr.strip()))


@pytest.fixture
def link():
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root (ip netns add); running as uid %d" % os.geteuid())
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` command is not installed")
    pair = Link()
    try:
        pair.create()
    except RuntimeError as exc:
        pair.remove()
        pytest.skip("cannot create network namespaces here: %s" % exc)
    try:
        yield pair
    finally:
        pair.remove()
        assert ip("netns", "pids", pair.relay_ns).returncode != 0, "namespace %s left behind" % pair.relay_ns


def status_from(link: Link, endpoint: str, keys: str) -> dict:
    """`relay status --json` run in the trainers' namespace (the only place the relay's address is)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run([*link.exec_in(link.trainer_ns), sys.executable, "-m", "relay", "status", "--json",
                           "--endpoint", endpoint, "--keys", keys], env=env, capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_trainer_in_another_namespace_reaches_a_curve_relay_and_strangers_do_not(
        link, relay_factory, trainer_factory, fake_wandb, tmp_path):
    keys, other = tmp_path / "keys", tmp_path / "other"
    make_keys(keys, "node1")
    make_keys(other, "stranger")
    (other / "stranger" / "relay.key").write_bytes((keys / "relay.key").read_bytes())
    endpoint = "tcp://%s:5555" % link.relay_ip
    relay = relay_factory(None, ["--mode", "offline", "--curve", str(keys)], endpoint=endpoint,
                          prefix=link.exec_in(link.relay_ns), start=False)
    relay.start(wait=False)
    relay.wait_log("relay listening on %s (CurveZMQ)" % endpoint, 60)

    remote = link.exec_in(link.trainer_ns)
    base = {"endpoint": endpoint, "steps": 300, "metrics": 12, "seed": 21}
    good = trainer_factory(dict(base, run_id="netns1", name="across", keys=str(keys / "node1"),
                                spill_dir=str(tmp_path / "spill-good")), prefix=remote)
    stranger = trainer_factory(dict(base, run_id="stranger", keys=str(other / "stranger"), finish_timeout=3,
                                    spill_dir=str(tmp_path / "spill-stranger")), prefix=remote)
    plain = trainer_factory(dict(base, run_id="plain", finish_timeout=3, spill_dir=str(tmp_path / "spill-plain")),
                            prefix=remote)
    done = good.event("finished")
    assert done["report"]["delivered"] is True and done["stats"]["acked"] == 302 and done["stats"]["errors"] == 0
    for name, trainer in (("stranger", stranger), ("plain", plain)):
        refused = trainer.event("finished")
        assert refused["report"]["delivered"] is False, name
        assert refused["stats"]["acked"] == 0 and refused["stats"]["spilled"] == 302, (name, refused["stats"])

    status = status_from(link, endpoint, str(keys / "node1"))
    assert [(r["run_id"], r["received"]) for r in status["runs"]] == [("netns1", 302)]
    relay.wait_log("refused a client at %s: its Curve public key" % link.trainer_ip, 30)
    relay.wait_log("failed the Curve handshake", 30)
    deadline = time.monotonic() + 60
    while not status["runs"][0]["finished"]:
        assert time.monotonic() < deadline, "the offline run did not finish: %s\n%s" % (status, relay.log())
        status = status_from(link, endpoint, str(keys / "node1"))   # each call waits on the relay's reply
    location = status["runs"][0]["location"]
    assert relay.stop() == 0
    assert relay.log().count("refused a client at %s" % link.trainer_ip) == 1

    env = wandb_env(fake_wandb, str(tmp_path / "home"))
    sync = subprocess.run([os.path.join(os.path.dirname(sys.executable), "wandb"), "sync", location],
                          env=env, capture_output=True, text=True, timeout=120)
    assert sync.returncode == 0, sync.stdout + sync.stderr
    fake_wandb.wait_for(lambda: "netns1" in fake_wandb.runs() and len(fake_wandb.run("netns1").history) == 300, 60)
    assert sorted(fake_wandb.runs()) == ["netns1"]
    assert_history(fake_wandb.run("netns1").history, seed=21, steps=300, metrics=12)
