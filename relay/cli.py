"""`relay` command line: serve, status, replay, keys, demo.

This module is trainer side (relay/sides.py): a base install (no extras, Python 3.8+) runs `relay
status` and `relay keys`. The commands that need the server extra (`serve`, `replay`, `demo`,
`status --watch`) import the relay-side modules inside themselves, through `relay_side()`, which
turns a missing server extra into one line saying what to install (exit code 2).
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
from typing import TYPE_CHECKING

import click
import msgpack

from relay import keys as curve_keys
from relay import protocol, sides
from relay.errors import RelayError
from relay.status import RelayStatus, query_status  # noqa: F401 (query_status: part of this module's API)

if TYPE_CHECKING:
    from relay.config import RelayConfig


class MissingExtra(click.ClickException, RelayError):
    """A command that needs an extra the install lacks; exit code 2, like a usage error."""
    exit_code = 2


def relay_side(command: str, *modules: str) -> list:
    """Import the relay-side modules `command` needs. Without the server extra: MissingExtra naming
    the command and the pip line. Any other ImportError (a broken install) propagates as it is."""
    try:
        return [importlib.import_module(name) for name in modules]
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in sides.SERVER_EXTRA_MODULES:
            raise
        raise MissingExtra("relay %s needs the relay's server extra (module %s is not installed): %s"
                           % (command, exc.name, sides.SERVER_EXTRA_INSTALL)) from None


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")


def _load_config(command: str, path: str | None, **flags) -> RelayConfig:
    relay_config, = relay_side(command, "relay.config")
    try:
        return relay_config.load(path, flags)
    except relay_config.ConfigError as exc:
        raise click.ClickException(str(exc))


config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                             help="relay.yaml to read (keys: docs/configuration.md); RELAY_* variables and flags override it")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """tokenhsi-relay: training metrics and checkpoints to W&B without slowing the trainer.

    `serve`, `replay`, `demo` and `status --watch` need the server extra (pip install
    'tokenhsi-relay[server]'); `status` and `keys` run on the base install."""


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
@click.option("--upload-interval", type=float,
              help="whole seconds between a run's uploads of new rows to W&B, while the runs stay within "
                   "upload_requests per second [2]")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@click.option("--curve", "curve_dir", type=click.Path(file_okay=False),
              help="directory made by `relay keys new`: encrypt with CurveZMQ and let in only the client keys "
                   "in its authorized/ (required to bind a non-loopback address)")
@click.option("--insecure", is_flag=True, default=None,
              help="allow a non-loopback --bind without --curve (anyone on that network can send runs)")
def serve(config_path, bind, spool_dir, mode, artifact_roots, drain_timeout, init_timeout, metrics_bind,
          upload_interval, log_level, curve_dir, insecure) -> None:
    """Run the relay until SIGTERM/SIGINT (first: drain with a deadline; second: stop now)."""
    server, spool, wandbenv = relay_side("serve", "relay.server", "relay.spool", "relay.wandbenv")
    bad_environment = wandbenv.problem(os.environ)
    if bad_environment:
        click.echo("relay serve: %s" % bad_environment, err=True)
        sys.exit(2)
    cfg = _load_config("serve", config_path, bind=bind, spool_dir=spool_dir, mode=mode,
                       artifact_roots=list(artifact_roots) or None, drain_timeout=drain_timeout,
                       init_timeout=init_timeout, metrics_bind=metrics_bind, upload_interval=upload_interval,
                       log_level=log_level, curve_dir=curve_dir, insecure=insecure)
    _setup_logging(cfg.log_level)
    try:
        code = server.RelayServer(cfg).serve()
    except spool.SpoolError as exc:
        raise click.ClickException(str(exc))
    sys.exit(code)


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
@click.option("--all", "every_run", is_flag=True,
              help="list every run the spool holds, finished ones included (asked for a page at a time)")
def status(endpoint: str, as_json: bool, timeout: float, keys: str | None, live: bool, interval: float,
           count: int | None, every_run: bool) -> None:
    """Per run: records received, uploaded (confirmed by W&B), pending (not yet confirmed: unsent +
    unconfirmed); W&B state; spool size. Lists the active runs and the last few finished ones;
    --all lists every run."""
    not_answering = ("no relay answered at %s within %.0f s (is `relay serve` running there? pass --endpoint "
                     "or set RELAY_ENDPOINT; a relay started with --curve answers only with --keys DIR or "
                     "RELAY_CLIENT_KEYS)" % (endpoint, timeout))
    try:
        if keys:
            curve_keys.load_client_keys(keys)  # a bad key directory is said once, before any polling
        if live:
            if as_json:
                raise click.UsageError("--watch draws a live view; for JSON poll `relay status --json` instead")
            if every_run:
                raise click.UsageError("--watch shows the active runs; list every run once with `relay status --all`")
            console, relay_watch = relay_side("status --watch", "rich.console", "relay.watch")
            poll = lambda: query_status(endpoint, timeout, keys)  # noqa: E731
            if not relay_watch.watch(poll, endpoint, interval, count, console.Console()):
                raise click.ClickException(not_answering)
            return
        reply = query_status(endpoint, timeout, keys, every_run)
    except curve_keys.CurveKeyError as exc:
        raise click.ClickException(str(exc))
    if reply is None:
        raise click.ClickException(not_answering)
    if as_json:
        click.echo(json.dumps(reply, sort_keys=True))
        return
    print_status(RelayStatus.from_dict(reply))


def print_status(status: RelayStatus) -> None:
    """The `relay status` table: the relay, its totals, one line per run listed."""
    click.echo("relay %s  mode %s  up %.0f s  spool %s (%.1f MB)" % (
        status.bind, status.mode, status.uptime, status.spool_path, status.spool_bytes / 1e6))
    if status.holding_line():
        click.echo(status.holding_line())
    if status.wandb_down_since:
        click.echo("W&B unreachable since %s" % time.strftime("%H:%M:%S", time.localtime(status.wandb_down_since)))
    click.echo(status.totals_line())
    if not status.runs:
        click.echo("no runs yet")
    for run in status.runs:
        since = time.strftime("%H:%M:%S", time.localtime(run.state_since)) if run.state_since else "-"
        lag = "lag %.0f s" % run.oldest_pending_age if run.oldest_pending_age is not None else "no lag"
        line = "%-14s %-20s received %-7d uploaded %-7d pending %-7d (unsent %d, unconfirmed %d) %-9s %s since %s" % (
            run.run_id, (run.project or "") + "/" + (run.name or ""), run.received, run.uploaded,
            run.pending, run.unsent, run.unconfirmed, lag, run.state, since)
        if run.last_error:  # for a run settling, why it waits
            line += "  %s: %s" % ("waiting" if run.state == "settling" else "last error", run.last_error)
        click.echo(line)
    if status.not_listed():
        click.echo(status.not_listed())


@main.command()
@config_option
@click.option("--spool-dir", help="spool of the relay that should upload these records")
@click.option("--artifact-root", "artifact_roots", multiple=True,
              help="directory the spilled checkpoints may be read from (repeatable), as for `relay serve`; "
                   "a checkpoint outside every root is refused")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
def replay(config_path, spool_dir, artifact_roots, files) -> None:
    """Ingest client spill files into the spool, exactly once (a running relay uploads them).

    Reads the configuration `relay serve` reads (--config, RELAY_* variables, flags): a spilled
    checkpoint is checked against the same artifact roots and size limit as a live one."""
    server, spool_module, snapshots = relay_side("replay", "relay.server", "relay.spool", "relay.snapshots")
    cfg = _load_config("replay", config_path, spool_dir=spool_dir, artifact_roots=list(artifact_roots) or None)
    _setup_logging(cfg.log_level)
    classify, Spool, SpoolError = server.classify, spool_module.Spool, spool_module.SpoolError
    SnapshotDir = snapshots.SnapshotDir
    try:
        spool = Spool(cfg.spool_dir)
    except SpoolError as exc:
        raise click.ClickException(str(exc))
    spool.load_watermarks()
    snapshot_dir = SnapshotDir(cfg.spool_dir, cfg.artifact_roots, cfg.max_artifact_bytes, cfg.max_spool_bytes)
    totals = {"new": 0, "dup": 0, "error": 0, "unreadable": 0, "skipped": 0}
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
        checkpoints = sum(1 for item in items if item[0].get("t") == "checkpoint")
        if checkpoints and not cfg.artifact_roots:
            # a checkpoint refused for want of a root would use up its record: take nothing from this file
            click.echo("%s: not replayed: it holds %d checkpoints and no artifact root is configured; give "
                       "`relay replay` the relay's --artifact-root DIR (or RELAY_ARTIFACT_ROOTS=DIR, or "
                       "--config) and run it again" % (path, checkpoints), err=True)
            totals["skipped"] += 1
            continue
        items = [_snapshot(item, snapshot_dir, spool, cfg.max_media_bytes) for item in items]
        counts = {"new": 0, "dup": 0, "error": 0}
        for start in range(0, len(items), cfg.batch_max):
            batch = items[start:start + cfg.batch_max]
            for item, outcome in zip(batch, spool.ingest(batch, allow_gaps=True)):
                if item[0].get("t") in ("checkpoint", "media") and outcome.status != "new" and not item[1] and \
                        not spool.has_record(outcome.stream, outcome.seq):
                    snapshot_dir.discard(item[0])
                counts[outcome.status] += 1
                if outcome.status == "error":
                    click.echo("%s: refused seq %d: %s" % (path, outcome.seq, outcome.reason), err=True)
        for key, value in counts.items():
            totals[key] += value
        click.echo("%s: %d records new, %d already delivered, %d refused%s" % (
            path, counts["new"], counts["dup"], counts["error"],
            "; file is torn after its last whole record (%s)" % torn if torn else ""))
    spool.close()
    snapshot_dir.close()
    click.echo("replayed %d files: %d new records in %s (a running relay uploads them within a second; "
               "follow with `relay status --watch`)" % (len(files), totals["new"], cfg.spool_dir))
    if totals["error"]:
        click.echo("%d records were refused (said above) and will not be uploaded; the others were taken"
                   % totals["error"], err=True)
    if totals["error"] or totals["skipped"]:
        sys.exit(1)


def _snapshot(item: tuple, snapshot_dir, spool, max_media_bytes: int) -> tuple:
    """A replayed checkpoint or media record gets its snapshot as the relay's intake would give it
    (a copy is made here, in this process): the files as they are now, refused if they changed since
    they were logged."""
    from relay import mediafiles
    from relay.artifacts import RefusedPath
    from relay.snapshots import SnapshotError

    message, refusal = item[0], item[1]
    if message.get("t") not in ("checkpoint", "media") or refusal or message["seq"] <= spool.upto(message["stream"]):
        return item
    try:
        if message["t"] == "media":
            mediafiles.take(snapshot_dir, message, max_media_bytes)
            return item
        opened = snapshot_dir.take(message)
        if opened is not None:
            try:
                snapshot_dir.copy(opened)
            finally:
                opened.close()
    except RefusedPath as exc:
        return (message, str(exc))
    except SnapshotError as exc:
        raise click.ClickException("%s; this spill file was not replayed (files before it were): run `relay replay` "
                                   "again once the spool's disk has room" % exc)
    return item


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


@main.group()
def tokenhsi() -> None:
    """Integrate a TokenHSI checkout (works with the trainer-side install alone)."""


@tokenhsi.command("patch")
@click.argument("path", type=click.Path(exists=True))
@click.option("--check", is_flag=True, help="print the change as a diff and write nothing (exit 1 if there is one)")
@click.option("--revert", is_flag=True, help="take the change back out (the file's bytes as before the patch)")
def tokenhsi_patch(path: str, check: bool, revert: bool) -> None:
    """Make PATH/tokenhsi/run.py (PATH: a TokenHSI checkout) report training and --test --eval
    results through the relay; switch off its wandb.init/wandb.finish. Idempotent."""
    from relay.integrations import tokenhsi_patch as patcher

    try:
        run_py = patcher.locate(path)
        with open(run_py, encoding="utf-8", newline="") as handle:
            before = handle.read()
        if revert:
            after, notes = patcher.revert(before), []
        else:
            after, notes = patcher.apply(before, run_py)
    except (patcher.PatchError, OSError, UnicodeDecodeError) as exc:
        click.echo("relay tokenhsi patch: %s" % exc, err=True)
        sys.exit(2)
    for note in notes:
        click.echo("%s: %s" % (run_py, note))
    if after == before:
        click.echo("%s: %s" % (run_py, "not patched: nothing to revert" if revert else "already patched: nothing to do"))
        return
    if check:
        click.echo(patcher.diff(before, after, run_py), nl=False)
        sys.exit(1)
    patcher.write_atomically(run_py, after)
    click.echo("%s: %s" % (run_py, "reverted to the original" if revert else
                           "patched: training and --test --eval report through the relay (RELAY_ENDPOINT); "
                           "`relay tokenhsi patch --revert` takes it back"))


@main.command()
@click.option("--dir", "directory", default="relay-demo", show_default=True,
              help="where the demo keeps its spool, checkpoints and offline W&B run")
@click.option("--steps", default=200, show_default=True, help="training steps the demo client logs")
def demo(directory: str, steps: int) -> None:
    """Start a relay (offline mode), send a demo run through it from another process, stop it."""
    relay_side("demo", "relay.server")  # the demo starts `relay serve`
    relay_demo, = relay_side("demo", "relay.demo")
    sys.exit(relay_demo.run_demo(os.path.abspath(directory), steps))


if __name__ == "__main__":
    main()
