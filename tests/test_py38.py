"""The trainer side on a base install: real Python 3.8 (IsaacGym's), and Python 3.11 without extras.

relay/sides.py names the trainer-side modules. Each is imported on a real 3.8 with only the base
requirements installed, and none may import a relay-side module; a 3.8 trainer process logs through
a real relay (3.11, `relay serve`) to the fake W&B backend; and the `relay` command of both base
installs runs `--help`, `status`, `keys`, and says in one line which extra `serve`, `replay`, `demo`
and `status --watch` need.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess

import pytest

from harness import ROOT
from relay import sides
from test_e2e import assert_history

pytestmark = pytest.mark.timeout(240)

# Every module of the package that is not trainer side is relay side.
RELAY_SIDE = sorted({"relay." + os.path.basename(path)[:-3] for path in glob.glob(os.path.join(ROOT, "relay", "*.py"))}
                    - set(sides.TRAINER_SIDE) - {"relay.__init__", "relay.__main__"})
IMPORTED = """
import json, sys, importlib
importlib.import_module(sys.argv[1])
import relay
print(json.dumps({"version": list(sys.version_info[:2]), "relay": relay.__file__, "modules": sorted(sys.modules)}))
"""


def run(command: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "PYTHON"))}
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_relay_side_is_what_the_trainer_side_is_not():
    assert "relay.server" in RELAY_SIDE and "relay.config" in RELAY_SIDE and "relay.uploader" in RELAY_SIDE
    assert "relay.client" not in RELAY_SIDE and "relay.cli" in sides.TRAINER_SIDE
    missing = [m for m in sides.TRAINER_SIDE if not os.path.isfile(os.path.join(ROOT, sides.source_file(m)))]
    assert missing == [], "vermin would be given files that do not exist: %s" % missing


@pytest.mark.parametrize("module", sides.TRAINER_SIDE)
def test_trainer_side_module_imports_on_python38_without_relay_side_modules(py38_python, module):
    result = run([py38_python, "-c", IMPORTED, module])
    assert result.returncode == 0, "%s does not import on Python 3.8 with the base install:\n%s" % (
        module, result.stderr)
    imported = json.loads(result.stdout)
    assert imported["version"] == [3, 8]
    assert imported["relay"] == os.path.join(ROOT, "relay", "__init__.py")  # this checkout's code
    loaded = set(imported["modules"])
    relay_side = sorted(name for name in loaded if name in RELAY_SIDE
                        or name.partition(".")[0] in sides.SERVER_EXTRA_MODULES)
    assert relay_side == [], "%s imports relay-side modules: %s" % (module, relay_side)


def test_python38_trainer_delivers_every_row_through_a_relay(py38_python, fake_wandb, relay_factory,
                                                             trainer_factory):
    relay = relay_factory(fake_wandb, ["--mode", "online"])
    trainer = trainer_factory({"endpoint": relay.endpoint, "run_id": "py38", "steps": 300, "metrics": 20,
                               "seed": 38, "project": "tokenHSI", "name": "isaacgym-python", "provenance": True},
                              python=py38_python)
    done = trainer.event("finished")
    assert trainer.proc.wait(timeout=30) == 0
    assert done["report"]["delivered"] is True and done["stats"]["acked"] == 303, done  # open, meta, rows, finish
    fake_wandb.wait_for(lambda: fake_wandb.complete("py38"), 120)
    run = fake_wandb.run("py38")
    assert (run.project, run.display_name or run.name, run.exit_code) == ("tokenHSI", "isaacgym-python", 0)
    assert json.loads(run.files["wandb-metadata.json"])["python"].startswith("3.8.")
    assert_history(run.history, seed=38, steps=300, metrics=20)
    assert relay.stop() == 0


def test_python38_numpy_values_pack_as_plain_numbers(py38_python):
    """rl_games hands numpy scalars to the observer: on 3.8 they pack as the numbers they hold."""
    script = ("import json, numpy, msgpack; from relay import protocol;"
              "message = msgpack.unpackb(protocol.encode({'v': 1, 't': 'log', 'stream': 's', 'seq': 1, 'run': 'r',"
              " 'metrics': {'f32': numpy.float32(0.1), 'f64': numpy.float64(-2.5e-300), 'i64': numpy.int64(2**40),"
              " 'arr': numpy.array([7.25], dtype=numpy.float32)[0]}}), raw=False);"
              "print(json.dumps({k: [repr(v), type(v).__name__] for k, v in message['metrics'].items()}))")
    result = run([py38_python, "-c", script])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"f32": [repr(float.fromhex("0x1.99999ap-4")), "float"],
                                         "f64": ["-2.5e-300", "float"], "i64": [str(2 ** 40), "int"],
                                         "arr": ["7.25", "float"]}


@pytest.fixture(params=["py38", "base"])
def base_install(request) -> str:
    """The bin/ directory of a base install (no extras): Python 3.8 and Python 3.11."""
    python = request.getfixturevalue(request.param + "_python")
    return os.path.dirname(python)


def test_relay_command_on_a_base_install_runs_status_keys_and_names_the_extra_for_the_rest(
        base_install, relay_factory, tmp_path):
    relay_command = os.path.join(base_install, "relay")
    assert run([os.path.join(base_install, "python"), "-c", "import pydantic"]).returncode != 0, \
        "this venv must lack the server extra"
    helped = run([relay_command, "--help"])
    assert helped.returncode == 0, helped.stderr
    for command in ("serve", "status", "replay", "keys", "demo", "tokenhsi"):
        assert "\n  %s " % command in helped.stdout, helped.stdout

    # the TokenHSI integration command is trainer side: it patches and reverts a checkout here
    checkout = tmp_path / "checkout"
    (checkout / "tokenhsi").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "tests", "tokenhsi_shaped", "tokenhsi", "run.py"), checkout / "tokenhsi" / "run.py")
    original = (checkout / "tokenhsi" / "run.py").read_bytes()
    patched = run([relay_command, "tokenhsi", "patch", str(checkout)])
    assert patched.returncode == 0 and patched.stdout.endswith("`relay tokenhsi patch --revert` takes it back\n"), patched
    assert (checkout / "tokenhsi" / "run.py").read_bytes().count(b"# tokenhsi-relay\n") == 4
    assert run([relay_command, "tokenhsi", "patch", "--revert", str(checkout)]).returncode == 0
    assert (checkout / "tokenhsi" / "run.py").read_bytes() == original

    relay = relay_factory(None, ["--mode", "offline"])  # the relay itself: full install, Python 3.11
    status = run([relay_command, "status", "--json", "--endpoint", relay.endpoint])
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["bind"] == relay.endpoint
    plain = run([relay_command, "status", "--endpoint", relay.endpoint])
    assert plain.returncode == 0 and plain.stdout.startswith("relay %s  mode offline" % relay.endpoint), plain
    made = run([relay_command, "keys", "new", str(tmp_path / "keys"), "--client", "node1"])
    assert made.returncode == 0, made.stderr
    assert os.path.isfile(tmp_path / "keys" / "authorized" / "node1.key")

    spill = tmp_path / "spill.msgpack"
    spill.write_bytes(b"")
    needs = {("serve",): "relay serve", ("replay", str(spill)): "relay replay", ("demo",): "relay demo",
             ("status", "--watch", "--endpoint", relay.endpoint): "relay status --watch"}
    for args, said in needs.items():
        result = run([relay_command, *args])
        assert result.returncode == 2, result
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: %s needs the relay's server extra (module " % said), \
            result.stderr
        assert lines[0].endswith("is not installed): pip install 'tokenhsi-relay[server]'"), result.stderr


SAMPLE = """
import json, time
from relay.sysmetrics import ProcReader
reader = ProcReader()
sum(range(3000000))
time.sleep(0.05)
print(json.dumps(reader.sample()))
"""


def test_system_sample_on_python38(py38_python):
    result = run([py38_python, "-c", SAMPLE])
    assert result.returncode == 0, result.stderr
    sample = json.loads(result.stdout)
    assert sorted(sample) == ["cpu", "memory_percent", "proc.cpu.threads", "proc.memory.availableMB",
                              "proc.memory.percent", "proc.memory.rssMB"]
    assert 0 < sample["cpu"] <= 100 and 0 < sample["proc.memory.rssMB"] < sample["proc.memory.availableMB"] * 100


def test_python38_media_items_and_histograms_in_plain_python(py38_python, tmp_path):
    """relay.Image and relay.Histogram on 3.8: the wire item of a file, bins without numpy equal numpy's."""
    (tmp_path / "a.png").write_bytes(b"png")
    script = ("import json, sys, numpy, relay; from relay import histogram, media;"
              "values = [v / 7.0 for v in range(-20, 31)] + [float('nan')];"
              "mine = histogram._bin_in_python(values, 9);"
              "counts, edges = numpy.histogram(numpy.array(values[:-1]), bins=9);"
              "scalars, items, problems = media.split({'x': 1, 'a': relay.Image(sys.argv[1]),"
              " 'h': relay.Histogram(values, bins=9)});"
              "print(json.dumps([mine == (counts.tolist(), edges.tolist()), scalars, items['a']['path'],"
              " items['a']['stat']['size'], items['h']['counts'] == mine[0], problems]))")
    result = run([py38_python, "-c", script, str(tmp_path / "a.png")])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [True, {"x": 1}, str(tmp_path / "a.png"), 3, True, []]
