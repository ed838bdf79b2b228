"""The deployment files agree with the code: docker-compose.yml, Dockerfile, deploy/relay.service.

No Docker engine or systemd runs here, so these are static checks against the real CLI (click's
own command tree and parser) and the real configuration loader: every `relay` subcommand and
option the files use must exist, and each stop deadline must outlast the drain it waits for.
"""
from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import click
import pytest
import yaml
from harness import ROOT

from relay import config as relay_config
from relay.cli import main as relay_cli

COMPOSE = os.path.join(ROOT, "docker-compose.yml")
DOCKERFILE = os.path.join(ROOT, "Dockerfile")
UNIT = os.path.join(ROOT, "deploy", "relay.service")


# -- helpers -----------------------------------------------------------------------------------


def cli_problems(argv: list[str], where: str) -> list[str]:
    """What is wrong with `relay ARGV` as written in `where`: unknown subcommands or options."""
    command: click.Command = relay_cli
    path = ["relay"]
    rest = list(argv)
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        name = rest.pop(0)
        if name not in command.commands:
            return ["%s: `%s %s`: relay.cli has no command %r (it has: %s)"
                    % (where, " ".join(path), name, name, ", ".join(sorted(command.commands)))]
        command = command.commands[name]
        path.append(name)
    if isinstance(command, click.Group):
        return ["%s: `%s` names a command group, not a command" % (where, " ".join(path))]
    known = {opt for param in command.params for opt in param.opts + param.secondary_opts}
    return ["%s: `%s` has no option %s (it has: %s)" % (where, " ".join(path), token.split("=")[0],
                                                         ", ".join(sorted(o for o in known if o.startswith("--"))))
            for token in rest if token.startswith("-") and token.split("=")[0] not in known]


def serve_params(argv: list[str]) -> dict:
    """click's own parse of `relay serve ARGV` (types checked), as the serve function receives it."""
    assert argv[0] == "serve", argv
    with relay_cli.commands["serve"].make_context("serve", list(argv[1:])) as context:
        return dict(context.params)


def status_timeout(argv: list[str]) -> float:
    """click's own parse of `relay status ARGV`: how long it waits for the relay."""
    with relay_cli.commands["status"].make_context("status", list(argv)) as context:
        return context.params["timeout"]


def effective_config(argv: list[str], environ: dict) -> relay_config.RelayConfig:
    """The relay configuration `relay serve ARGV` gets with these RELAY_* variables (the same
    merge as relay.cli.serve: defaults < environment < flags)."""
    params = serve_params(argv)
    assert params.get("config_path") is None, "a --config file inside the container cannot be checked here"
    flags = {key: value for key, value in params.items()
             if key in relay_config.RelayConfig.model_fields and value not in (None, ())}
    if "artifact_roots" in flags:
        flags["artifact_roots"] = list(flags["artifact_roots"])
    relay_vars = {k: v for k, v in environ.items() if k.startswith("RELAY_")}
    for name, value in relay_vars.items():
        assert "$" not in str(value), "%s=%r is interpolated; its value cannot be checked" % (name, value)
    return relay_config.load(None, flags, environ={k: str(v) for k, v in relay_vars.items()})


def seconds(duration: str | float) -> float:
    """A compose (Go-style: 1m30s) or systemd (90, 90s, 1min 30s) duration in seconds."""
    if isinstance(duration, (int, float)):
        return float(duration)
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", duration.strip())
    assert parts and re.fullmatch(r"(\s*\d+(?:\.\d+)?\s*[a-z]*)+", duration.strip()), duration
    return sum(float(number) * units[unit or "s"] for number, unit in parts)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    with open(DOCKERFILE) as handle:
        for line in handle:
            stripped = line.strip()
            if not pending and (not stripped or stripped.startswith("#")):
                continue
            if stripped.endswith("\\"):
                pending += stripped[:-1] + " "
                continue
            whole = (pending + stripped).strip()
            pending = ""
            instruction, _, arguments = whole.partition(" ")
            instructions.append((instruction.upper(), arguments.strip()))
    return instructions


def dockerfile_env() -> dict:
    env = {}
    for instruction, arguments in dockerfile_instructions():
        if instruction == "ENV":
            for item in shlex.split(arguments):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def exec_form(instruction: str) -> list[str]:
    values = [arguments for name, arguments in dockerfile_instructions() if name == instruction]
    assert len(values) == 1, "the Dockerfile must have exactly one %s" % instruction
    parsed = json.loads(values[0])  # exec form is a JSON array; shell form is not JSON
    assert isinstance(parsed, list) and all(isinstance(item, str) for item in parsed), values[0]
    return parsed


# A `relay` command in a comment: at the start of the comment, after .../bin/, or after
# `docker compose exec relay` (the service is called relay too); up to two spaces, &&, ; or ).
COMMENT_COMMAND = re.compile(r"(?:^#\s*|bin/|compose exec relay )relay ((?:[^\s&;)#]+ ?)+)")


def commented_commands(path: str) -> list[list[str]]:
    """The argv (after `relay`) of every relay command shown in the file's comments."""
    with open(path) as handle:
        return [match.group(1).split() for line in handle if line.lstrip().startswith("#")
                for match in COMMENT_COMMAND.finditer(line.strip())]


@pytest.fixture(scope="module")
def compose() -> dict:
    with open(COMPOSE) as handle:
        return yaml.safe_load(handle)


@pytest.fixture(scope="module")
def relay_service(compose) -> dict:
    assert list(compose["services"]) == ["relay"]
    return compose["services"]["relay"]


def compose_environment(service: dict) -> dict:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) if "=" in item else (item, None) for item in environment)
    return environment


def compose_argv(service: dict) -> list[str]:
    entrypoint = service.get("entrypoint", exec_form("ENTRYPOINT"))
    command = service.get("command", exec_form("CMD"))
    assert isinstance(entrypoint, list), "compose entrypoint must be exec form (a list), not %r" % entrypoint
    assert isinstance(command, list), "compose command must be exec form (a list), not %r" % command
    return entrypoint + command


def compose_config(service: dict) -> relay_config.RelayConfig:
    argv = compose_argv(service)
    assert argv[0] == "relay"
    environ = dict(dockerfile_env())
    environ.update(compose_environment(service))
    return effective_config(argv[1:], environ)


# -- docker-compose.yml ------------------------------------------------------------------------


def test_compose_commands_exist_in_the_cli(relay_service):
    argv = compose_argv(relay_service)
    assert argv[:2] == ["relay", "serve"]
    health = relay_service["healthcheck"]["test"]
    assert isinstance(health, list) and health[0] == "CMD", "healthcheck must be exec form: %r" % health
    assert health[1:3] == ["relay", "status"], "the healthcheck must run `relay status`: %r" % health
    problems = cli_problems(argv[1:], "docker-compose.yml command") + \
        cli_problems(health[2:], "docker-compose.yml healthcheck")
    assert not problems, "\n".join(problems)
    serve_params(argv[1:])  # and click parses them (types, choices)
    status_timeout(health[3:])


def test_compose_stop_grace_period_outlasts_the_drain(relay_service):
    drain = compose_config(relay_service).drain_timeout
    grace = seconds(relay_service["stop_grace_period"])
    assert grace > drain, "stop_grace_period %s s must exceed drain_timeout %s s" % (grace, drain)
    assert relay_service.get("stop_signal", "SIGTERM") == "SIGTERM"
    healthcheck = relay_service["healthcheck"]
    assert seconds(healthcheck["timeout"]) > status_timeout(healthcheck["test"][3:]), \
        "the healthcheck's timeout must outwait `relay status --timeout`"


def test_compose_spool_is_a_named_volume_and_keys_are_read_only(compose, relay_service):
    config = compose_config(relay_service)
    mounts = {}
    for volume in relay_service["volumes"]:  # SOURCE:TARGET[:ro]; a ${VAR:-default} source may hold colons
        source, target, *options = re.sub(r"\$\{[^}]*\}", "$VAR", volume).split(":")
        mounts[target] = (source, options)
    assert config.spool_dir in mounts, "no volume mounted at the spool dir %s" % config.spool_dir
    source, _ = mounts[config.spool_dir]
    assert source in (compose.get("volumes") or {}), "the spool must be a named volume, not %r" % source
    curve = serve_params(compose_argv(relay_service)[1:]).get("curve_dir")
    assert curve in mounts and mounts[curve][1] == ["ro"], "the keys dir %s must be mounted read-only" % curve
    for root in config.artifact_roots:
        assert root in mounts and mounts[root][1] == ["ro"], "artifact root %s must be mounted read-only" % root


def test_compose_restart_api_key_from_environment_port_on_one_interface(relay_service):
    assert relay_service["restart"] == "unless-stopped"
    environment = compose_environment(relay_service)
    assert "WANDB_API_KEY" in environment, "the relay needs WANDB_API_KEY from the environment"
    key = environment["WANDB_API_KEY"]
    assert key is None or re.fullmatch(r"\$\{WANDB_API_KEY(:?[?-][^}]*)?\}", key), \
        "WANDB_API_KEY must come from the environment (${WANDB_API_KEY...}), never a literal: %r" % key
    port = compose_config(relay_service).bind.rsplit(":", 1)[1]
    published = [str(p) for p in relay_service["ports"] if str(p).endswith(":%s" % port)]
    assert len(published) == 1, relay_service["ports"]
    parts = published[0].rsplit(":", 2)  # ADDRESS:HOST_PORT:CONTAINER_PORT; without ADDRESS: every interface
    assert len(parts) == 3 and parts[0] not in ("", "0.0.0.0", "[::]", "::"), \
        "publish %s on the cluster interface only (ADDRESS:%s:%s), not on every interface" % (port, port, port)
    assert relay_service.get("init") is True, "an init process must reap wandb-core orphans of failed uploaders"


def test_commands_shown_in_comments_exist_in_the_cli():
    shown = {path: commented_commands(path) for path in (COMPOSE, DOCKERFILE, UNIT)}
    assert [argv[:2] for argv in shown[COMPOSE]] == [["keys", "new"], ["status", "--watch"]]
    assert [argv[:2] for argv in shown[UNIT]] == [["keys", "new"], ["status", "--watch"]]
    problems = [problem for path, commands in shown.items() for argv in commands
                for problem in cli_problems(argv, "%s comment `relay %s`" % (os.path.basename(path), " ".join(argv)))]
    assert not problems, "\n".join(problems)


# -- Dockerfile --------------------------------------------------------------------------------


def test_dockerfile_base_user_install_volume_and_exec_form():
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    users = [arguments for name, arguments in instructions if name == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0"), "the relay must not run as root"
    last_user = max(i for i, (name, _) in enumerate(instructions) if name == "USER")
    assert last_user < min(i for i, (name, _) in enumerate(instructions) if name == "ENTRYPOINT")
    installs = [arguments for name, arguments in instructions if name == "RUN" and "pip install" in arguments]
    assert len(installs) == 1 and re.search(r"""pip install ["']?\.\[server\]["']?(\s|$)""", installs[0]), installs
    entrypoint, command = exec_form("ENTRYPOINT"), exec_form("CMD")
    assert entrypoint == ["relay"]
    problems = cli_problems(command, "Dockerfile CMD")
    assert not problems, "\n".join(problems)
    spool_dir = effective_config(command, dockerfile_env()).spool_dir
    assert spool_dir == "/var/lib/relay"
    volumes = [json.loads(arguments) for name, arguments in instructions if name == "VOLUME"]
    assert [spool_dir] in volumes


# -- systemd -----------------------------------------------------------------------------------


def read_unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",), comment_prefixes=("#", ";"))
    unit.optionxform = str  # systemd keys are case-sensitive
    with open(UNIT) as handle:
        unit.read_file(handle)
    return unit


def unit_argv(unit: configparser.ConfigParser) -> list[str]:
    argv = shlex.split(unit["Service"]["ExecStart"])
    assert os.path.basename(argv[0]) == "relay", argv
    return argv


def test_systemd_unit_runs_existing_commands_and_outlasts_the_drain():
    unit = read_unit()
    service = unit["Service"]
    argv = unit_argv(unit)
    problems = cli_problems(argv[1:], "deploy/relay.service ExecStart")
    assert not problems, "\n".join(problems)
    environ = {}
    for line in service.get("Environment", "").split():
        key, _, value = line.partition("=")
        environ[key] = value
    drain = effective_config(argv[1:], environ).drain_timeout
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed", "SIGTERM must reach the relay alone: it stops its uploaders itself"
    assert seconds(service["TimeoutStopSec"]) > drain, "TimeoutStopSec must exceed drain_timeout %s s" % drain
    assert service["Restart"] in ("on-failure", "always")
    assert service.get("User") not in (None, "root")
    assert unit["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    """systemd's own parser: unknown keys and bad values are warnings naming the file."""
    relay_binary = os.path.join(os.path.dirname(sys.executable), "relay")
    assert os.access(relay_binary, os.X_OK), relay_binary
    with open(UNIT) as handle:
        text = handle.read()
    copy = tmp_path / "tokenhsi-relay.service"
    copy.write_text(text.replace(unit_argv(read_unit())[0], relay_binary))  # a binary that exists here
    verify = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, check=False, timeout=60)
    output = verify.stdout + verify.stderr
    assert verify.returncode == 0 and str(copy) not in output and copy.name not in output, output
