"""`relay` command line: serve, status, replay, keys, demo."""
from __future__ import annotations

import json
import logging
import os
import sys
import time

import click
import msgpack
import zmq

from relay import config as relay_config
from relay import keys as curve_keys
from relay import protocol


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")


def _load_config(path: str | None, **flags) -> relay_config.RelayConfig:
    try:
        return relay_config.load(path, flags)
    except relay_config.ConfigError as exc:
        raise click.ClickException(str(exc))


config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                             help="relay.yaml to read (keys: see README); RELAY_* variables and flags override it")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """tokenhsi-relay: training metrics and checkpoints to W&B without slowing the trainer."""


@main.command()
@config_option
@click.option("--bind", help="ZeroMQ endpoint to listen on [tcp://127.0.0.1:5555]")
@click.option("--spool-dir", help="directory for the spool and offline runs")
@click.option("--mode", type=click.Choice(["online", "offline", "disabled"]),
              help="W&B mode for runs that do not ask for one [online if an API key is configured, else offline]")
@click.option("--artifact-root", "artifact_roots", multiple=True,
              help="directory checkpoints may be read from (repeatable); nothing else is ever read")
@click.option("--drain-timeout", type=float, help="seconds to keep uploading after SIGTERM [30]")
@click.option("--init-timeout", type=float, help="seconds wandb.init may take before it is retried [60]")
@click.option("--metrics-bind", help="HOST:PORT to serve Prometheus metrics on (/metrics) [off]")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@click.option("--curve", "curve_dir", type=click.Path(file_okay=False),
              help="directory made by `relay keys new`: encrypt with CurveZMQ and let in only the client keys "
                   "in its authorized/ (required to bind a non-loopback address)")
@click.option("--insecure", is_flag=True, default=None,
              help="allow a non-loopback --bind without --curve (anyone on that network can send runs)")
def serve(config_path, bind, spool_dir, mode, artifact_roots, drain_timeout, init_timeout, metrics_bind,
          log_level, curve_dir, insecure) -> None:
    """Run the relay until SIGTERM/SIGINT (first: drain with a deadline; second: stop now)."""
    cfg = _load_config(config_path, bind=bind, spool_dir=spool_dir, mode=mode,
                       artifact_roots=list(artifact_roots) or None, drain_timeout=drain_timeout,
                       init_timeout=init_timeout, metrics_bind=metrics_bind, log_level=log_level,
                       curve_dir=curve_dir, insecure=insecure)
    _setup_logging(cfg.log_level)
    from relay.server import RelayServer  # imports wandb: only for the commands that need it
    from relay.spool import SpoolError
    try:
        code = RelayServer(cfg).serve()
    except SpoolError as exc:
        raise click.ClickException(str(exc))
    sys.exit(code)


def query_status(endpoint: str, timeout: float, keys: str | None = None) -> dict | None:
    """Ask a running relay for its status; None if nothing answers within `timeout`.
    `keys`: a client key directory of `relay keys new`, for a relay started with --curve."""
    context = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys:
        curve_keys.load_client_keys(keys).apply(sock)
    try:
        sock.connect(endpoint)
        request = {"v": protocol.VERSION, "t": "status", "stream": "status-%d" % os.getpid(), "seq": 0}
        deadline = time.monotonic() + timeout
        sent = False
        while time.monotonic() < deadline:
            if not sent:
                try:
                    sock.send(protocol.encode(request), zmq.NOBLOCK)
                    sent = True
                except zmq.Again:
                    pass
            if sock.poll(100, zmq.POLLIN):
                reply = protocol.decode_raw(sock.recv())
                if reply.get("t") == "status":
                    return reply
        return None
    finally:
        sock.close(linger=0)


@main.command()
@click.option("--endpoint", envvar="RELAY_ENDPOINT", default=protocol.DEFAULT_ENDPOINT, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the status as one JSON object")
@click.option("--timeout", type=float, default=3.0, show_default=True, help="seconds to wait for the relay")
@click.option("--keys", envvar=curve_keys.CLIENT_KEYS_VARIABLE, type=click.Path(file_okay=False),
              help="client key directory (DIR/<name> of `relay keys new`) for a relay started with --curve "
                   "[$RELAY_CLIENT_KEYS]")
@click.option("--watch", "live", is_flag=True, help="keep polling and show a live view (Ctrl-C to stop)")
@click.option("--interval", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="seconds between polls with --watch")
@click.option("--count", type=click.IntRange(min=1), help="with --watch: stop after this many refreshes")
def status(endpoint: str, as_json: bool, timeout: float, keys: str | None, live: bool, interval: float,
           count: int | None) -> None:
    """Per run: records received, uploaded, pending; W&B state; spool size."""
    not_answering = ("no relay answered at %s within %.0f s (is `relay serve` running there? pass --endpoint "
                     "or set RELAY_ENDPOINT; a relay started with --curve answers only with --keys DIR or "
                     "RELAY_CLIENT_KEYS)" % (endpoint, timeout))
    try:
        if keys:
            curve_keys.load_client_keys(keys)  # a bad key directory is said once, before any polling
        if live:
            if as_json:
                raise click.UsageError("--watch draws a live view; for JSON poll `relay status --json` instead")
            from rich.console import Console

            from relay.watch import watch
            if not watch(lambda: query_status(endpoint, timeout, keys), endpoint, interval, count, Console()):
                raise click.ClickException(not_answering)
            return
        reply = query_status(endpoint, timeout, keys)
    except curve_keys.CurveKeyError as exc:
        raise click.ClickException(str(exc))
    if reply is None:
        raise click.ClickException(not_answering)
    if as_json:
        click.echo(json.dumps(reply, sort_keys=True))
        return
    click.echo("relay %s  mode %s  up %.0f s  spool %s (%.1f MB)" % (
        reply["bind"], reply["mode"], reply["uptime"], reply["spool_path"], reply["spool_bytes"] / 1e6))
    if reply.get("holding") or reply.get("spool_error"):
        click.echo("HOLDING new records (not acked): %s" % (reply.get("spool_error") or reply.get("hold_reason")
                                                              or "spool over max_spool_bytes"))
    if reply.get("wandb_down_since"):
        click.echo("W&B unreachable since %s" % time.strftime("%H:%M:%S", time.localtime(reply["wandb_down_since"])))
    if not reply["runs"]:
        click.echo("no runs yet")
    for run in reply["runs"]:
        since = time.strftime("%H:%M:%S", time.localtime(run["state_since"])) if run["state_since"] else "-"
        lag = "lag %.0f s" % run["oldest_pending_age"] if run["oldest_pending_age"] is not None else "no lag"
        line = "%-14s %-20s received %-7d uploaded %-7d pending %-7d %-9s %s since %s" % (
            run["run_id"], (run["project"] or "") + "/" + (run["name"] or ""), run["received"], run["uploaded"],
            run["pending"], lag, run["state"], since)
        if run["last_error"]:
            line += "  last error: %s" % run["last_error"]
        click.echo(line)


@main.command()
@config_option
@click.option("--spool-dir", help="spool of the relay that should upload these records")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
def replay(config_path, spool_dir, files) -> None:
    """Ingest client spill files into the spool, exactly once (a running relay uploads them)."""
    cfg = _load_config(config_path, spool_dir=spool_dir)
    _setup_logging(cfg.log_level)
    from relay.server import classify
    from relay.spool import Spool, SpoolError
    try:
        spool = Spool(cfg.spool_dir)
    except SpoolError as exc:
        raise click.ClickException(str(exc))
    spool.load_watermarks()
    totals = {"new": 0, "dup": 0, "error": 0, "unreadable": 0}
    for path in files:
        items, torn = [], None
        with open(path, "rb") as handle:
            unpacker = msgpack.Unpacker(handle, raw=False, max_buffer_size=cfg.max_frame_bytes * 2)
            try:
                for frame in unpacker:
                    if not isinstance(frame, bytes):
                        totals["unreadable"] += 1
                        continue
                    try:
                        items.append(classify(frame, cfg))
                    except protocol.ProtocolError as exc:
                        totals["unreadable"] += 1
                        click.echo("%s: skipped an unreadable record: %s" % (path, exc.reason), err=True)
            except (msgpack.OutOfData, ValueError) as exc:
                torn = exc
        items = [item for item in items if item[0].get("t") != "status"]
        counts = {"new": 0, "dup": 0, "error": 0}
        for start in range(0, len(items), cfg.batch_max):
            for outcome in spool.ingest(items[start:start + cfg.batch_max], allow_gaps=True):
                counts[outcome.status] += 1
                if outcome.status == "error":
                    click.echo("%s: refused seq %d: %s" % (path, outcome.seq, outcome.reason), err=True)
        for key, value in counts.items():
            totals[key] += value
        click.echo("%s: %d records new, %d already delivered, %d refused%s" % (
            path, counts["new"], counts["dup"], counts["error"],
            "; file is torn after its last whole record (%s)" % torn if torn else ""))
    spool.close()
    click.echo("replayed %d files: %d new records in %s (a running relay uploads them within a second; "
               "follow with `relay status --watch`)" % (len(files), totals["new"], cfg.spool_dir))


@main.group()
def keys() -> None:
    """CurveZMQ keys for a relay that listens on the network."""


@keys.command("new")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--client", "clients", multiple=True, help="name of a client keypair to make (repeatable) [client]")
@click.option("--force", is_flag=True, help="replace existing key files (trainers holding the old keys are refused)")
def keys_new(directory: str, clients: tuple, force: bool) -> None:
    """Make the relay's keypair (kept if DIRECTORY has one) and a keypair per client in DIRECTORY."""
    directory = os.path.abspath(directory)
    try:
        made = curve_keys.create_keys(directory, list(clients) or [curve_keys.DEFAULT_CLIENT], force)
    except (curve_keys.CurveKeyError, OSError) as exc:
        raise click.ClickException(str(exc))
    public, secret = made["relay"]
    click.echo("relay keypair: %s (%s)" % (secret, "new" if made["relay_created"] else "kept"))
    click.echo("  stays on the relay host; start it with: relay serve --curve %s --bind tcp://0.0.0.0:5555" % directory)
    if made["relay_created"] and force:
        click.echo("  a new relay keypair: every client directory made before needs this relay.key (%s)" % public)
    for name, client_dir in made["clients"].items():
        click.echo("client %s: public key %s accepted by the relay" % (
            name, os.path.join(directory, curve_keys.AUTHORIZED, name + ".key")))
        click.echo("  copy %s/ to the trainer nodes (keep it private) and set %s=<that directory> there"
                   % (client_dir, curve_keys.CLIENT_KEYS_VARIABLE))
    if not made["relay_created"]:
        click.echo("a running relay started with --curve %s lets the new clients in within a second" % directory)


@main.command()
@click.option("--dir", "directory", default="relay-demo", show_default=True,
              help="where the demo keeps its spool, checkpoints and offline W&B run")
@click.option("--steps", default=200, show_default=True, help="training steps the demo client logs")
def demo(directory: str, steps: int) -> None:
    """Start a relay (offline mode), send a demo run through it from another process, stop it."""
    from relay.demo import run_demo
    sys.exit(run_demo(os.path.abspath(directory), steps))


if __name__ == "__main__":
    main()
