"""Relay configuration: cfg/relay.yaml, overridden by RELAY_* variables, overridden by flags.

Validated once at start. Unknown keys, duplicate keys and wrong types are errors that name the
key and where it came from. WANDB_API_KEY is never read from here: only from the environment or
netrc of the relay host, by the wandb SDK itself.
"""
from __future__ import annotations

import os
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from relay import protocol
from relay.yamlfile import ConfigError, load_yaml  # noqa: F401 (ConfigError is part of this module's API)

# Variables the trainer side reads; harmless when the relay's environment has them too.
CLIENT_VARIABLES = {"RELAY_ENDPOINT", "RELAY_SPILL_DIR", "RELAY_CLIENT_KEYS"}
TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off", ""}


def default_spool_dir() -> str:
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "tokenhsi-relay", "spool")


class RelayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    bind: str = Field(protocol.DEFAULT_ENDPOINT, description="ZeroMQ endpoint the relay listens on")
    curve_dir: Optional[str] = Field(None, description="directory made by `relay keys new`: CurveZMQ with only "
                                     "the client keys in its authorized/ let in; required for a non-loopback bind")
    insecure: bool = Field(False, description="allow a non-loopback bind without CurveZMQ (logged as a warning)")
    spool_dir: str = Field(default_factory=default_spool_dir, description="where the spool and offline runs live")
    mode: Optional[Literal["online", "offline", "disabled"]] = Field(
        None, description="W&B mode for runs that do not ask for one; default online if an API key is configured")
    artifact_roots: list[str] = Field(default_factory=list,
                                      description="the only directories checkpoints and media may be read from")
    max_frame_bytes: int = Field(protocol.MAX_FRAME_BYTES, gt=0, description="largest accepted frame")
    max_artifact_bytes: int = Field(4 << 30, gt=0, description="largest checkpoint file uploaded")
    max_media_bytes: int = Field(100 << 20, gt=0, description="largest media file (image, video, audio, HTML) "
                                 "uploaded; the relay copies each into its spool")
    init_timeout: float = Field(60.0, gt=0, description="seconds wandb.init may take before it is retried")
    backoff_max: float = Field(60.0, gt=0, description="longest wait between W&B retries (init, uploads)")
    request_timeout: float = Field(60.0, gt=0, description="seconds one W&B HTTP request may take before a retry")
    confirm_every: float = Field(30.0, gt=0, description="seconds between asking W&B how many rows of a run "
                                 "it holds (lets the spool shrink mid-run; notices outages)")
    wandb_count_lag: float = Field(10.0, ge=0, le=3600, description="longest W&B takes to count the history "
                                   "rows it received (it counts them seconds late); a run the relay handed rows to "
                                   "is resumed only once W&B's count reaches them, or this long after the last "
                                   "writer of the run stopped")
    max_unconfirmed_rows: int = Field(20000, gt=0, description="rows handed to the wandb SDK but not yet on "
                                      "the server before the uploader waits (keeps the backlog on disk)")
    max_spool_bytes: int = Field(20 << 30, gt=0, description="spool size past which the relay holds new "
                                 "messages (policy 'hold': no ack, clients keep and spill them)")
    min_free_bytes: int = Field(256 << 20, ge=0, description="the relay holds new messages while less than this "
                                "is free for the spool (free disk plus the spool's own free pages): the room "
                                "uploads need to write to the spool, and so to empty it, when a backlog fills "
                                "the disk; 0: no reserve (hold when the next batch would not fit, or a write fails)")
    drain_timeout: float = Field(30.0, ge=0, description="seconds the first SIGTERM spends uploading before exit")
    batch_max: int = Field(500, gt=0, description="most messages per spool commit")
    silence_timeout: float = Field(600.0, ge=0, description="seconds without a record or heartbeat from a "
                                   "run's trainer before the run is finished in W&B with silence_exit_code; 0: never")
    silence_exit_code: int = Field(1, description="exit code W&B shows for a run whose trainer went silent")
    metrics_bind: Optional[str] = Field(None, description="HOST:PORT for a Prometheus /metrics endpoint; null: off")
    progress_backlog: int = Field(10000, gt=0, description="a run with this many records waiting to upload gets "
                                  "progress lines in the log (count, rate, ETA) until its backlog is gone")
    progress_every: float = Field(10.0, gt=0, description="seconds between backlog progress lines")
    upload_interval: float = Field(2.0, ge=1, description="whole seconds between a run's uploads of new rows to "
                                   "W&B (wandb-core's file-stream interval), while the budget below allows it")
    upload_requests: float = Field(20.0, gt=0, description="W&B file-stream requests per second the relay allows "
                                   "itself, all runs together: while N runs are live, each uploads every "
                                   "max(upload_interval, N / upload_requests) seconds on average")
    retention: float = Field(7 * 86400.0, ge=0, description="seconds a run stays in the spool's runs table (and in "
                             "`relay status`) after W&B confirmed its finish and every record, before it moves to the "
                             "archive (`relay status --all` still lists it); 0: at once")
    archive_retention: float = Field(90 * 86400.0, ge=0, description="seconds an archived run is kept (for `relay "
                                     "status --all`) before it is deleted, with its lost and quarantined rows")
    watermark_retention: float = Field(90 * 86400.0, ge=7 * 86400.0, description="seconds a stream's watermark (what "
                                       "makes a re-sent or replayed record a duplicate) is kept after the stream's last "
                                       "record; a spill file replayed later than that is refused, not uploaded twice")
    runs_per_uploader: int = Field(100, ge=1, le=1000, description="most runs one uploader process serves, "
                                   "each in a thread of its own over the shared wandb-core; 1: a process per run")
    uploader_hosts: int = Field(0, ge=0, le=64, description="uploader processes the first runs are spread over "
                                "before runs share one (a process's runs share one core); 0: the CPUs, at most 4")
    stuck_timeout: float = Field(300.0, gt=0, description="seconds one W&B call of a run may take in an uploader "
                                 "process serving other runs too; then that process is replaced (its other runs "
                                 "resume in a fresh one) and the run goes on in a process of its own")
    uploader_nice: int = Field(10, ge=0, le=19, description="how much lower than the server's the CPU priority of "
                               "the uploaders and wandb-core is (nice increment): with the CPUs busy, taking records "
                               "from trainers comes before uploading them; 0: the same priority")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("upload_interval")
    @classmethod
    def _whole_seconds(cls, value: float) -> float:
        if value != int(value):
            raise ValueError("%g is not a whole number of seconds: wandb-core counts its file-stream interval in "
                             "whole seconds (it would cut %g to %d); use %d or %d" % (
                                 value, value, int(value), int(value), int(value) + 1))
        return value

    @field_validator("metrics_bind")
    @classmethod
    def _host_port(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            parse_host_port(value)
        return value


def parse_host_port(bind: str) -> tuple[str, int]:
    """'HOST:PORT' or '[IPv6]:PORT' -> (host, port); ValueError saying what is wrong."""
    host, sep, port = bind.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("%r is not HOST:PORT (e.g. 127.0.0.1:9464)" % bind)
    return host, int(port)


def _from_environment(environ: dict) -> dict:
    values: dict[str, Any] = {}
    fields = RelayConfig.model_fields
    for name, raw in environ.items():
        if not name.startswith("RELAY_") or name in CLIENT_VARIABLES:
            continue
        key = name[len("RELAY_"):].lower()
        if key not in fields:
            raise ConfigError("unknown variable %s (known: %s)"
                              % (name, ", ".join("RELAY_" + k.upper() for k in fields)))
        annotation = fields[key].annotation
        try:
            if annotation is bool:
                values[key] = _boolean(raw)
            elif annotation is int:
                values[key] = int(raw)
            elif annotation is float:
                values[key] = float(raw)
            elif annotation == list[str]:
                values[key] = [part for part in raw.split(os.pathsep) if part]
            else:
                values[key] = raw
        except ValueError as exc:
            raise ConfigError("variable %s=%r: %s" % (name, raw, exc)) from exc
    return values


def _boolean(raw: str) -> bool:
    word = raw.strip().lower()
    if word in TRUE_WORDS or word in FALSE_WORDS:
        return word in TRUE_WORDS
    raise ValueError("expected one of %s" % ", ".join(sorted(TRUE_WORDS | FALSE_WORDS - {""})))


def load(path: Optional[str] = None, overrides: Optional[dict] = None,
         environ: Optional[dict] = None) -> RelayConfig:
    """Merge file < environment < flags (flags given as `overrides`, None meaning not given)."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    layers = [(path or "", load_yaml(path) if path else {}),
              ("environment", _from_environment(os.environ if environ is None else environ)),
              ("command line", {k: v for k, v in (overrides or {}).items() if v is not None})]
    for source, layer in layers:
        for key, value in layer.items():
            values[key] = value
            sources[key] = source
    try:
        return RelayConfig(**values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = ".".join(str(part) for part in error["loc"])
            where = sources.get(str(error["loc"][0]), "defaults") if error["loc"] else "config"
            problems.append("%s (from %s): %s" % (key, where, error["msg"]))
        raise ConfigError("invalid relay configuration:\n  " + "\n  ".join(problems)) from None
