"""Which modules run where: the trainer side (a base install on a GPU node) and the relay side.

The trainer side is what `pip install tokenhsi-relay` (no extras) runs: the client a training loop
imports, the rl_games/TokenHSI integrations, and the `relay` command's trainer-side subcommands
(`status`, `keys`, `tokenhsi patch`). It runs on Python 3.8
(IsaacGym environments) and imports only the base requirements (pyzmq, msgpack, click) and the
standard library. Every other module of the package is relay side and may use the server extra.
The test suite imports each trainer-side module on a real Python 3.8 and checks that none of them
imports a relay-side module; scripts/test.sh runs vermin over their files.
"""

TRAINER_SIDE = (
    "relay",
    "relay.sides",
    "relay.errors",
    "relay.modes",
    "relay.durable",
    "relay.protocol",
    "relay.limits",
    "relay.tensors",
    "relay.media",
    "relay.histogram",
    "relay.keys",
    "relay.client",
    "relay.console",
    "relay.console_lines",
    "relay.outbox",
    "relay.spill",
    "relay.spilling",
    "relay.connection",
    "relay.iothread",
    "relay.provenance",
    "relay.sysmetrics",
    "relay.runthreads",
    "relay.status",
    "relay.rl_games",
    "relay.cli",
    "relay.integrations",
    "relay.integrations.rl_games",
    "relay.integrations.rl_games_tags",
    "relay.integrations.rl_games_writer",
    "relay.integrations.rl_games_rows",
    "relay.integrations.rl_games_checkpoints",
    "relay.integrations.tokenhsi",
    "relay.integrations.tokenhsi_patch",
)

# Top-level modules the server extra (`pip install 'tokenhsi-relay[server]'`) provides.
SERVER_EXTRA_MODULES = ("wandb", "pydantic", "yaml", "tenacity", "rich", "prometheus_client", "PIL")

SERVER_EXTRA_INSTALL = "pip install 'tokenhsi-relay[server]'"


PACKAGES = ("relay", "relay.integrations", "relay.sinks")


def source_file(module: str) -> str:
    """The file of a module of this package, relative to the checkout: relay.cli -> relay/cli.py,
    relay.integrations -> relay/integrations/__init__.py."""
    return module.replace(".", "/") + ("/__init__.py" if module in PACKAGES else ".py")
