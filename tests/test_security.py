"""Security (issue 5): CurveZMQ on the relay socket, the bind policy, `relay keys new`, and
checkpoint paths a client must not be able to make the relay read. Real relay subprocesses,
real sockets, the real wandb SDK against the fake W&B server."""
from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys

import msgpack
import pytest
import zmq

from harness import ROOT, free_tcp_port, wandb_env
from relay import config as relay_config
from relay.client import RelayClient
from relay.keys import CurveKeyError, load_client_keys, load_relay_keys, read_key_file
from relay.security import is_loopback
from test_e2e import assert_history
from workload import frame, row

pytestmark = pytest.mark.timeout(240)


def relay_cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    run_env = dict(env or os.environ)
    run_env["PYTHONPATH"] = ROOT
    return subprocess.run([sys.executable, "-m", "relay", *args], env=run_env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def make_keys(directory, *clients: str) -> None:
    args = ["keys", "new", str(directory)] + [arg for name in clients for arg in ("--client", name)]
    made = relay_cli(*args)
    assert made.returncode == 0, made.stderr


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# -- relay keys new ----------------------------------------------------------------------------------

def test_keys_new_writes_private_keypairs_and_refuses_to_overwrite(tmp_path):
    keys = tmp_path / "keys"
    made = relay_cli("keys", "new", str(keys), "--client", "node1", "--client", "node2")
    assert made.returncode == 0, made.stderr
    assert "relay serve --curve %s" % keys in made.stdout
    assert "copy %s/ to the trainer nodes" % (keys / "node1") in made.stdout and "RELAY_CLIENT_KEYS" in made.stdout
    relay_public, relay_secret, authorized = load_relay_keys(str(keys))
    assert authorized == [str(keys / "authorized" / "node1.key"), str(keys / "authorized" / "node2.key")]
    for name in ("node1", "node2"):
        client = load_client_keys(str(keys / name))
        assert client.server == relay_public and client.public != relay_public and client.secret != relay_secret
        assert read_key_file(str(keys / "authorized" / (name + ".key")), secret=False) == (client.public, None)
        assert sorted(os.listdir(keys / name)) == sorted([name + ".key", name + ".key_secret", "relay.key"])
        assert mode(keys / name / (name + ".key_secret")) == 0o600 and mode(keys / name) == 0o700
        assert "secret-key" not in (keys / "authorized" / (name + ".key")).read_text()
        assert "secret-key" not in (keys / name / "relay.key").read_text()
    assert mode(keys / "relay.key_secret") == 0o600 and mode(keys) == 0o700 and mode(keys / "authorized") == 0o700
    assert sorted(os.listdir(keys)) == ["authorized", "node1", "node2", "relay.key", "relay.key_secret"]

    before = {path: path.read_bytes() for path in keys.rglob("*") if path.is_file()}
    again = relay_cli("keys", "new", str(keys), "--client", "node1")
    assert again.returncode != 0
    assert "refusing to overwrite existing key files: %s" % (keys / "authorized" / "node1.key") in again.stderr
    assert "--force" in again.stderr
    assert {path: path.read_bytes() for path in keys.rglob("*") if path.is_file()} == before

    added = relay_cli("keys", "new", str(keys), "--client", "node3")   # a new client: the relay keypair is kept
    assert added.returncode == 0, added.stderr
    assert (keys / "relay.key_secret").read_bytes() == before[keys / "relay.key_secret"]
    assert load_client_keys(str(keys / "node3")).server == relay_public

    forced = relay_cli("keys", "new", str(keys), "--client", "node1", "--force")
    assert forced.returncode == 0, forced.stderr
    assert load_relay_keys(str(keys))[0] != relay_public
    assert load_client_keys(str(keys / "node1")).public != load_client_keys(str(keys / "node2")).public
    assert load_client_keys(str(keys / "node1")).server == load_relay_keys(str(keys))[0]


def test_client_key_directory_mistakes_are_named(tmp_path):
    keys = tmp_path / "keys"
    make_keys(keys, "client")
    with pytest.raises(CurveKeyError, match="not a directory"):
        RelayClient("tcp://127.0.0.1:1", keys=str(tmp_path / "nowhere"))
    with pytest.raises(CurveKeyError, match="not DIR itself"):
        RelayClient("tcp://127.0.0.1:1", keys=str(keys))           # the relay's directory, not a client's
    os.remove(keys / "client" / "relay.key")
    with pytest.raises(CurveKeyError, match="%s is missing" % (keys / "client" / "relay.key")):
        RelayClient("tcp://127.0.0.1:1", keys=str(keys / "client"))
    (keys / "client" / "relay.key").write_text("public-key = \"short\"\n")
    with pytest.raises(CurveKeyError, match="holds no valid public key"):
        load_client_keys(str(keys / "client"))


# -- the bind policy ---------------------------------------------------------------------------------

@pytest.mark.parametrize("endpoint, loopback", [
    ("tcp://127.0.0.1:5555", True), ("tcp://127.3.4.5:5555", True), ("tcp://[::1]:5555", True),
    ("tcp://localhost:5555", True), ("ipc:///tmp/relay.ipc", True), ("inproc://relay", True),
    ("tcp://0.0.0.0:5555", False), ("tcp://*:5555", False), ("tcp://10.0.0.1:5555", False),
    ("tcp://[::]:5555", False), ("tcp://eth0:5555", False), ("tcp://headnode:5555", False),
    ("ws://0.0.0.0:5555", False),
])
def test_loopback_endpoints(endpoint, loopback):
    assert is_loopback(endpoint) is loopback


def test_security_settings_from_file_environment_and_flags(tmp_path):
    path = tmp_path / "relay.yaml"
    path.write_text("curve_dir: /keys\ninsecure: true\n")
    cfg = relay_config.load(str(path), environ={})
    assert cfg.curve_dir == "/keys" and cfg.insecure is True
    cfg = relay_config.load(None, environ={"RELAY_CURVE_DIR": "/k2", "RELAY_INSECURE": "1", "RELAY_CLIENT_KEYS": "/c"})
    assert cfg.curve_dir == "/k2" and cfg.insecure is True
    assert relay_config.load(None, environ={"RELAY_INSECURE": "false"}).insecure is False
    with pytest.raises(relay_config.ConfigError, match="RELAY_INSECURE='maybe'"):
        relay_config.load(None, environ={"RELAY_INSECURE": "maybe"})
    path.write_text("insecure: 'yes'\n")
    with pytest.raises(relay_config.ConfigError, match="insecure"):
        relay_config.load(str(path), environ={})


def test_network_bind_without_curve_or_insecure_is_refused(tmp_path):
    port = free_tcp_port()
    spool = tmp_path / "spool"
    env = wandb_env(None, str(tmp_path / "home"))
    refused = relay_cli("serve", "--bind", "tcp://0.0.0.0:%d" % port, "--spool-dir", str(spool), env=env)
    assert refused.returncode != 0
    assert "refusing to listen on tcp://0.0.0.0:%d: it is not a loopback address" % port in refused.stderr
    assert "relay keys new DIR" in refused.stderr and "--curve DIR" in refused.stderr
    assert "--insecure" in refused.stderr
    assert not spool.exists(), "the relay must refuse before it creates anything"


def test_insecure_network_bind_starts_with_a_warning(relay_factory):
    port = free_tcp_port()
    relay = relay_factory(None, ["--mode", "offline", "--insecure"], bind="tcp://0.0.0.0:%d" % port,
                          endpoint="tcp://127.0.0.1:%d" % port)
    assert relay.status()["bind"] == "tcp://0.0.0.0:%d" % port
    log = relay.log()
    assert log.count("WARNING relay.security: INSECURE: listening on tcp://0.0.0.0:%d without CurveZMQ" % port) == 1
    assert "relay listening on tcp://0.0.0.0:%d (no encryption)" % port in log
    assert relay.stop() == 0


@pytest.mark.parametrize("damage, message", [
    ("relay.key_secret", "relay.key_secret is missing"),
    ("authorized", "no client keys in"),
    ("garbage", "authorized/client.key holds no valid public key"),
])
def test_curve_relay_with_missing_keys_names_the_file(tmp_path, damage, message):
    keys = tmp_path / "keys"
    make_keys(keys, "client")
    if damage == "authorized":
        os.remove(keys / "authorized" / "client.key")
    elif damage == "garbage":
        (keys / "authorized" / "client.key").write_text('curve\n    public-key = "not a key"\n')
    else:
        os.remove(keys / damage)
    env = wandb_env(None, str(tmp_path / "home"))
    refused = relay_cli("serve", "--bind", "tcp://0.0.0.0:%d" % free_tcp_port(), "--curve", str(keys),
                        "--spool-dir", str(tmp_path / "spool"), env=env)
    assert refused.returncode != 0
    assert "cannot start CurveZMQ from --curve %s" % keys in refused.stderr
    assert message in refused.stderr and "relay keys new" in refused.stderr


# -- Curve: who gets in ------------------------------------------------------------------------------

def curve_relay(relay_factory, fake_wandb, keys, extra: list[str] = ()):
    port = free_tcp_port()
    return relay_factory(fake_wandb, ["--mode", "online", "--curve", str(keys), *extra],
                         endpoint="tcp://127.0.0.1:%d" % port, client_keys=str(keys / "trainer"))


def test_curve_relay_takes_authorized_clients_only(fake_wandb, relay_factory, tmp_path):
    keys, other = tmp_path / "keys", tmp_path / "other"
    make_keys(keys, "trainer")
    make_keys(other, "stranger")                      # a valid keypair the relay was never told about,
    (other / "stranger" / "relay.key").write_bytes((keys / "relay.key").read_bytes())  # aimed at this relay
    relay = curve_relay(relay_factory, fake_wandb, keys)

    stranger = RelayClient(relay.endpoint, keys=str(other / "stranger"), spill_dir=str(tmp_path / "spill-s"),
                           provenance=False, system_metrics=0)
    plain = RelayClient(relay.endpoint, spill_dir=str(tmp_path / "spill-p"),
                        provenance=False, system_metrics=0)       # no Curve at all
    outsiders = {"stranger": stranger, "plain": plain}
    for name, client in outsiders.items():
        run = client.start_run(project="tokenHSI", run_id="intruder-" + name)
        for step in range(50):
            run.log({"injected": step}, frame=step)
        assert client.flush(3.0) is False, "%s got its records acked" % name
    log = relay.log()
    stranger_key = load_client_keys(str(other / "stranger")).public.decode()
    refusal = "refused a client at 127.0.0.1: its Curve public key %s is not in %s" % (
        stranger_key, keys / "authorized")
    assert log.count(refusal) == 1, log
    relay.wait_log("failed the Curve handshake", 30)

    trainer = RelayClient(relay.endpoint, keys=str(keys / "trainer"), spill_dir=str(tmp_path / "spill-t"),
                          heartbeat_every=0.2, provenance=False, system_metrics=0)
    run = trainer.start_run(project="tokenHSI", name="curve", run_id="curve1")
    for step in range(300):
        run.log(row(11, step, 20), frame=frame(step), epoch=step + 1)
    assert trainer.flush(30.0) is True
    seen = relay.run_status("curve1")["last_seen"]     # from now on only heartbeats (their own socket) move it
    relay.wait_status(lambda s: s["runs"][0]["last_seen"] > seen + 0.5, 30, "heartbeats over Curve")
    report = run.finish(exit_code=0, timeout=60)
    assert report["delivered"] is True and report["acked"] == 302 and report["errors"] == 0
    trainer.close()

    reasons = {"stranger": "relay at %s refused this client's Curve key" % relay.endpoint,
               "plain": "RELAY_CLIENT_KEYS on the trainer"}   # the trainer's log says why, not only "absent"
    for name, client in outsiders.items():
        stats = client.statistics()
        assert stats["acked"] == 0 and stats["pending"] == 51 and stats["errors"] == 0, (name, stats)
        assert reasons[name] in stats["last_error"], (name, stats["last_error"])
        client.close()
        assert client.statistics()["spilled"] == 51   # kept on the trainer's disk, never lost
    fake_wandb.wait_for(lambda: fake_wandb.complete("curve1"), 120)
    assert sorted(fake_wandb.runs()) == ["curve1"]
    assert_history(fake_wandb.run("curve1").history, seed=11, steps=300, metrics=20)
    status = relay.status()
    assert [r["run_id"] for r in status["runs"]] == ["curve1"]
    assert status["counters"]["received"] == 302 and status["counters"].get("malformed", 0) == 0
    assert relay.log().count(refusal) == 1
    assert relay.stop() == 0


def test_refused_trainer_keeps_its_records_and_delivers_them_once_its_key_is_let_in(fake_wandb, relay_factory,
                                                                                  tmp_path):
    keys, late = tmp_path / "keys", tmp_path / "late"
    make_keys(keys, "trainer")
    make_keys(late, "node7")
    (late / "node7" / "relay.key").write_bytes((keys / "relay.key").read_bytes())
    relay = curve_relay(relay_factory, fake_wandb, keys)
    client = RelayClient(relay.endpoint, keys=str(late / "node7"), spill_dir=str(tmp_path / "spill"),
                         reconnect_after=1.0, provenance=False, system_metrics=0)
    run = client.start_run(project="tokenHSI", run_id="late1")
    for step in range(100):
        run.log(row(12, step, 10), frame=frame(step), epoch=step + 1)
    relay.wait_log("refused a client at 127.0.0.1", 30)
    assert client.flush(4.0) is False
    stats = client.statistics()
    assert stats["acked"] == 0 and stats["pending"] == 101
    assert "refused this client's Curve key" in stats["last_error"]

    (keys / "authorized" / "node7.key").write_bytes((late / "node7" / "node7.key").read_bytes())
    relay.wait_log("authorized client keys changed in %s: 2 let in now" % (keys / "authorized"), 30)
    report = run.finish(exit_code=0, timeout=60)       # the client made its socket anew and re-sent
    assert report["delivered"] is True and report["acked"] == 102 and report["spilled"] == 0
    client.close()
    fake_wandb.wait_for(lambda: fake_wandb.complete("late1"), 120)
    assert_history(fake_wandb.run("late1").history, seed=12, steps=100, metrics=10)


def test_trainer_with_keys_never_talks_to_a_relay_without_curve(relay_factory, tmp_path):
    keys = tmp_path / "keys"
    make_keys(keys, "trainer")
    relay = relay_factory(None, ["--mode", "offline"])            # loopback ipc://, no --curve
    client = RelayClient(relay.endpoint, keys=str(keys / "trainer"), spill_dir=str(tmp_path / "spill"),
                         provenance=False, system_metrics=0)
    run = client.start_run(project="tokenHSI", run_id="mismatch")
    run.log({"a": 1.0}, frame=1)
    assert client.flush(4.0) is False
    stats = client.statistics()
    assert stats["acked"] == 0 and stats["pending"] == 2
    assert "relay at %s" % relay.endpoint in stats["last_error"] and "RELAY_CLIENT_KEYS" in stats["last_error"]
    client.close()
    assert relay.status()["runs"] == []
    assert relay.stop() == 0


def test_a_key_removed_from_authorized_is_refused_at_its_next_connection(fake_wandb, relay_factory, tmp_path):
    keys = tmp_path / "keys"
    make_keys(keys, "trainer", "revoked")
    relay = curve_relay(relay_factory, fake_wandb, keys)
    before = RelayClient(relay.endpoint, keys=str(keys / "revoked"), spill_dir=str(tmp_path / "spill"),
                         provenance=False, system_metrics=0)
    assert before.start_run(project="tokenHSI", run_id="before").finish(timeout=30)["acked"] == 2
    before.close()
    os.remove(keys / "authorized" / "revoked.key")
    relay.wait_log("authorized client keys changed in %s: 1 let in now" % (keys / "authorized"), 30)
    after = RelayClient(relay.endpoint, keys=str(keys / "revoked"), spill_dir=str(tmp_path / "spill"),
                        provenance=False, system_metrics=0)
    report = after.start_run(project="tokenHSI", run_id="after").finish(timeout=4)
    assert report["delivered"] is False and report["acked"] == 0 and report["spilled"] == 2
    after.close()
    assert [r["run_id"] for r in relay.status()["runs"]] == ["before"]   # status itself uses the "trainer" key
    relay.wait_log("refused a client at 127.0.0.1", 30)


def test_status_of_a_curve_relay_needs_client_keys(fake_wandb, relay_factory, tmp_path):
    keys = tmp_path / "keys"
    make_keys(keys, "trainer")
    relay = curve_relay(relay_factory, fake_wandb, keys)
    env = wandb_env(None, str(tmp_path / "home"))
    without = relay_cli("status", "--endpoint", relay.endpoint, "--timeout", "2", env=env)
    assert without.returncode != 0
    assert "no relay answered at %s" % relay.endpoint in without.stderr and "--keys DIR" in without.stderr
    env["RELAY_CLIENT_KEYS"] = str(keys / "trainer")
    with_env = relay_cli("status", "--endpoint", relay.endpoint, "--json", env=env)
    assert with_env.returncode == 0, with_env.stderr
    assert '"bind": "%s"' % relay.endpoint in with_env.stdout
    del env["RELAY_CLIENT_KEYS"]
    with_flag = relay_cli("status", "--endpoint", relay.endpoint, "--keys", str(keys / "trainer"), env=env)
    assert with_flag.returncode == 0 and "no runs yet" in with_flag.stdout, with_flag.stderr


# -- checkpoint paths through a live relay -----------------------------------------------------------

def checkpoint_frame(seq: int, path: str) -> bytes:
    return msgpack.packb({"v": 1, "t": "checkpoint", "stream": "paths", "seq": seq, "run": "paths",
                          "path": path, "metadata": {"seq": seq}, "aliases": ["latest"]})


def next_error(sock: zmq.Socket) -> dict:
    while True:
        assert sock.poll(10_000, zmq.POLLIN), "no reply from the relay"
        reply = msgpack.unpackb(sock.recv(), raw=False)
        if reply["t"] == "error":
            return reply


def test_checkpoint_paths_outside_root_or_not_regular_files_are_refused_unread(fake_wandb, relay_factory, tmp_path):
    home = tmp_path / "home"                           # the relay's HOME (relay_factory)
    home.mkdir(exist_ok=True)
    netrc = home / ".netrc"
    netrc.write_text("machine api.wandb.ai login user password SECRET-API-KEY\n")
    root = tmp_path / "output"
    nn = root / "nn"
    nn.mkdir(parents=True)
    good = nn / "good.pth"
    good.write_bytes(b"g" * 800)
    os.symlink(netrc, nn / "netrc.pth")
    os.mkfifo(nn / "fifo.pth")
    (nn / "dir.pth").mkdir()
    (nn / "big.pth").write_bytes(b"b" * 1001)
    depth = len(str(nn).strip("/").split("/"))
    escape = str(nn) + "/.." * depth + "/etc/passwd"   # a literal `..` path (the client would normalize it)
    refused = {
        escape: "outside every artifact root",
        "../../etc/passwd": "must be absolute",
        str(nn / "netrc.pth"): "resolves to %s, outside every artifact root" % netrc,
        str(nn / "fifo.pth"): "not a regular file",
        str(nn / "dir.pth"): "not a regular file",
        str(nn / "missing.pth"): "No such file or directory",
        str(nn / "big.pth"): "1001 bytes is over the 1000-byte limit",
    }
    relay = relay_factory(fake_wandb, ["--mode", "online", "--artifact-root", str(root)],
                          env={"RELAY_MAX_ARTIFACT_BYTES": "1000"})
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(relay.endpoint)
    sock.send(msgpack.packb({"v": 1, "t": "open", "stream": "paths", "seq": 1, "run": "paths",
                             "settings": {"project": "tokenHSI"}}))
    for seq, (path, reason) in enumerate(refused.items(), start=2):
        sock.send(checkpoint_frame(seq, path))
        reply = next_error(sock)                       # answered at once: a FIFO is never opened
        assert reply["seq"] == seq and reply["stream"] == "paths"
        assert reply["reason"].startswith("checkpoint %s refused" % path) or \
            reply["reason"].startswith("checkpoint path %s refused" % path), reply
        assert reason in reply["reason"], (path, reply)
    last = len(refused) + 2
    sock.send(checkpoint_frame(last, str(good)))
    sock.send(msgpack.packb({"v": 1, "t": "finish", "stream": "paths", "seq": last + 1, "run": "paths",
                             "exit_code": 0}))
    fake_wandb.wait_for(lambda: fake_wandb.complete("paths"), 120)
    sock.close()

    with pytest.raises(OSError) as nobody_reads:  # the relay never opened the FIFO (and is not blocked in it)
        os.close(os.open(nn / "fifo.pth", os.O_WRONLY | os.O_NONBLOCK))
    assert nobody_reads.value.errno == errno.ENXIO
    artifacts = fake_wandb.artifacts()
    assert [(a.type, list(a.files), a.metadata) for a in artifacts] == [("model", ["good.pth"], {"seq": last})]
    assert artifacts[0].files["good.pth"] == b"g" * 800
    log = relay.log()
    for seq, path in enumerate(refused, start=2):
        assert "refused record seq=%d of stream paths: checkpoint" % seq in log and path in log
    status = relay.status()
    assert status["counters"]["refused"] == len(refused)
    assert [(r["run_id"], r["received"]) for r in status["runs"]] == [("paths", 3)]
    assert relay.stop() == 0


def test_training_config_relay_keys_reach_the_trainers_client(tmp_path):
    pytest.importorskip("rl_games")
    from relay.rl_games import RelayAlgoObserver
    from tokenhsi import config as train_config
    from tokenhsi.run import make_observer, parse_args

    shipped = os.path.join(ROOT, "cfg", "train", "amp_point_traj.yaml")
    cfg_train = tmp_path / "amp_point_traj.yaml"
    missing = tmp_path / "no-such-keys"
    with open(shipped) as handle:
        cfg_train.write_text(handle.read().replace("  keys: null", "  keys: %s" % missing))
    cfg = train_config.load(str(cfg_train), os.path.join(ROOT, "cfg", "env", "point_traj.yaml"))
    assert cfg.relay.keys == str(missing)
    args = parse_args(["--task", "PointTraj", "--cfg_env", "point_traj.yaml", "--cfg_train", str(cfg_train)])
    observer = make_observer(cfg, args)
    assert isinstance(observer, RelayAlgoObserver)
    with pytest.raises(CurveKeyError, match="%s is not a directory" % missing):  # the client got the keys
        observer.after_init(type("Algo", (), {"rank": 0, "config": {}})())


def test_opening_a_checkpoint_checks_the_file_it_opened_not_the_name(tmp_path, monkeypatch):
    """The relay opens a checkpoint (to snapshot it) after it checked its path; a directory swapped
    for a symlink (or a file for a FIFO) in between must gain nothing. Simulated by letting the
    path check pass what it saw before the swap."""
    from relay import artifacts

    root, home = tmp_path / "output", tmp_path / "home"
    (root / "ok").mkdir(parents=True)
    home.mkdir()
    (home / "ckpt.pth").write_text("machine api.wandb.ai password SECRET\n")
    os.symlink(home, root / "nn")                                  # was a directory under the root
    os.symlink(home / "ckpt.pth", root / "ok" / "last.pth")        # was a regular file
    os.mkfifo(root / "ok" / "fifo.pth")                            # was a regular file
    (root / "ok" / "good.pth").write_bytes(b"weights")
    monkeypatch.setattr(artifacts, "resolve_checkpoint", lambda path, roots, max_bytes, *naming: path)
    roots = [str(root)]
    open_before = len(os.listdir("/proc/self/fd"))
    cases = {
        str(root / "nn" / "ckpt.pth"): "resolves to %s, outside every artifact root" % (home / "ckpt.pth"),
        str(root / "ok" / "last.pth"): "Too many levels of symbolic links",
        str(root / "ok" / "fifo.pth"): "not a regular file",
    }
    for path, reason in cases.items():
        with pytest.raises(artifacts.RefusedPath, match=reason):
            artifacts.open_checkpoint(path, roots, 1000)
    assert len(os.listdir("/proc/self/fd")) == open_before, "a refused file was left open"
    fd = artifacts.open_checkpoint(str(root / "ok" / "good.pth"), roots, 1000)
    try:
        with open("/proc/self/fd/%d" % fd, "rb") as handle:
            assert handle.read() == b"weights"
    finally:
        os.close(fd)
