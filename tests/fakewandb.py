"""A fake W&B backend that the real wandb SDK 0.31 (its Go `wandb-core`) can talk to.

Point the SDK at it with ``FakeWandb.env()`` (WANDB_BASE_URL + WANDB_API_KEY). It records what it
receives (runs, history rows, summaries, artifacts with their exact bytes) and can inject faults.
The protocol was found by experiment against wandb 0.31.0, with the GraphQL documents embedded in
wandb-core as the guide to which response fields matter.

Emulated endpoints
  POST /graphql, dispatched on operationName (or the name in the query text):
      run:       UpsertBucket, RunResumeStatus, CreateRunFiles, Viewer, ServerFeaturesQuery
                 (ServerInfo), OrganizationCoreWeaveOrganizationID (asked by system metrics)
      artifacts: ArtifactType, CreateArtifact, FetchArtifactDigestAlgorithm, XXHashDigestsEnabled,
                 CreateArtifactManifest, UpdateArtifactManifest, CreateArtifactFiles,
                 CompleteMultipartUploadArtifact, CommitArtifact, ArtifactByID (Artifact.wait()),
                 UseArtifact
      and RelayServerStep, this project's own query for a run's historyLineCount.
      No optional server feature is reported, so the SDK takes its plain paths (no gzip, MD5
      manifests, no xxhash). Unknown operations get a GraphQL error and count as "graphql:<name>".
  POST /files/{entity}/{project}/{run}/file_stream
      {"files": {name: {"offset": N, "content": [lines]}}, "uploaded", "preempting", "complete",
      "exitcode"}. Content at offset N is *placed* at lines N.. of that file, as W&B does, so a resent
      chunk replaces lines instead of duplicating them. wandb-summary.json: one line, whole summary.
      A history line placed where a different line already was is an *overwrite*: the row that was
      there is gone. Each one is counted (FakeRun.overwrites, FakeWandb.overwrites()) so that tests
      can assert there were none; a resent chunk (the same lines again) overwrites nothing.
  PUT /upload/<key>
      Every upload URL handed out above points here: run files, artifact files, manifests, and
      multipart parts (wandb-core uses multipart only for files of 2 GiB and more).

Counting lag (``FakeWandb(lag=N)``): W&B counts history lines asynchronously, so what its readers
see trails what it has received. Here a history line becomes visible N seconds after it arrived:
historyLineCount (UpsertBucket, RunResumeStatus, RelayServerStep) and historyTail (where wandb-core
resumes its steps) answer from the history as it stood N seconds ago. A resume inside that window
continues the file stream at an offset that is already taken, and writes over rows the server holds,
as the real service does. ``FakeRun.history`` is what arrived, at once (what tests compare).

Artifacts: CreateArtifact is idempotent per clientID (a retried mutation gets the same artifact);
content equal to a committed version of the collection is deduplicated (state COMMITTED, so the SDK
uploads nothing and no version is added); aliases move between versions as on W&B.

Deliberately not emulated: wandb.Api() and read queries generally, sweeps, launch, artifact
downloads/use_artifact of stored files, reference artifacts, auth failures, rate limits,
"stopped" runs.

Faults (``set_fault``) apply to requests that arrive while set, to all of them or to one path (paths
"graphql", "file_stream", "upload", or "run_init": the two queries of wandb.init that start a run,
not the relay's own RelayServerStep), and optionally to one run's file_stream requests only
(``set_fault(mode, "file_stream", run=RUN_ID)``): "503" answers 503; "reset" reads
the request and closes the TCP connection with RST; "hang" reads it and never answers (the
connection is closed unanswered once the fault is cleared, the client gives up, or the fake stops).
Extra mode "lost_reply": the request is processed and recorded, then the connection is reset, so
the client cannot know it arrived (the lost-ack case for exactly-once tests).

Debugging: FAKEWANDB_DEBUG=1 prints every request to stderr.
"""
from __future__ import annotations

import collections
import copy
import gzip
import inspect
import hashlib
import base64
import json
import os
import re
import select
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import quote, unquote

FAULT_MODES = ("ok", "hang", "503", "reset", "lost_reply")
FAULT_PATHS = ("all", "graphql", "file_stream", "upload", "run_init")
RUN_INIT = ("graphql:UpsertBucket", "graphql:RunResumeStatus")  # what wandb.init asks W&B
HISTORY, SUMMARY, EVENTS, OUTPUT = "wandb-history.jsonl", "wandb-summary.json", "wandb-events.jsonl", "output.log"


@dataclass
class FakeRun:
    run_id: str
    entity: str
    project: str
    name: str = ""                   # the run's name in URLs: W&B uses the run id
    display_name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    notes: str | None = None
    config: dict = field(default_factory=dict)   # plain {key: value}; W&B's {"value": v} unwrapped, no _wandb
    history: list[dict] = field(default_factory=list)   # a gap in the offsets shows up as None
    summary: dict = field(default_factory=dict)
    exit_code: int | None = None
    complete: bool = False
    preempting: bool = False
    # Beyond the brief: raw protocol state, handy for debugging and for the resume answer.
    storage_id: str = ""
    raw_config: dict = field(default_factory=dict)   # as uploaded: {key: {"value": v, ...}, "_wandb": ...}
    events: list[dict] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)   # run files uploaded via CreateRunFiles
    overwrites: int = 0              # history lines placed over a different line that was there
    arrived: list = field(default_factory=list)  # wall time (time.time()) each history line arrived at
    file_stream_posts: int = 0       # file_stream requests for this run
    post_times: list = field(default_factory=list)  # wall time of each of those requests
    # The run's provenance fields as UpsertBucket set them (what the W&B run page shows).
    host: str | None = None
    program: str | None = None
    commit: str | None = None
    repo: str | None = None


@dataclass
class _SeenHistory:
    """A run's history as W&B's readers see it: the lines that arrived at least `lag` seconds ago."""
    lines: list = field(default_factory=list)
    unseen: collections.deque = field(default_factory=collections.deque)   # (arrived, offset, lines)


@dataclass
class FakeArtifact:
    name: str
    type: str
    metadata: dict
    aliases: list[str]
    files: dict[str, bytes]          # path in the artifact -> exact uploaded bytes
    run_id: str | None
    # Beyond the brief:
    id: str = ""
    version: int = -1                # v0, v1, ... within its collection, set on commit
    entity: str = ""
    project: str = ""
    digest: str | None = None
    client_id: str | None = None
    committed: bool = False
    manifest: dict | None = None     # wandb_manifest.json as uploaded


def _place(lines: list, offset: int, content: list, anomalies: list | None = None, what: str = "") -> None:
    """Put `content` at lines offset.. of a file, as the W&B server does with file_stream chunks.

    A resent chunk therefore overwrites the same lines instead of appending duplicates. A gap before
    `offset` is padded with None; gaps and rewrites with different content go to `anomalies`.
    """
    if anomalies is not None:
        if offset > len(lines):
            anomalies.append("%s: chunk at offset %d but only %d lines so far" % (what, offset, len(lines)))
        for i, item in enumerate(content[:max(0, len(lines) - offset)]):
            old = lines[offset + i]
            if not _same_line(old, item):
                anomalies.append("%s: line %d rewritten: %s -> %s" % (what, offset + i, old, item))
    while len(lines) < offset:
        lines.append(None)
    lines[offset:offset + len(content)] = content


def _same_line(old: Any, new: Any) -> bool:
    """Is `new` the line that is already there (nothing there counts as the same)?"""
    return old is None or json.dumps(old, sort_keys=True) == json.dumps(new, sort_keys=True)


def _unwrap_config(raw: dict) -> dict:
    return {k: (v.get("value") if isinstance(v, dict) and "value" in v else v)
            for k, v in raw.items() if k != "_wandb"}


class FakeWandb:
    entity = "fake-entity"

    def __init__(self, lag: float = 0.0):
        self.lag = lag                   # seconds before a history line counts (see the module docstring)
        self.api_key = "f" * 40          # 0.31 checks only: 40+ characters of [A-Za-z0-9_]
        self.base_url = ""
        self.requests_seen: collections.Counter = collections.Counter()
        self.request_log: collections.deque = collections.deque(maxlen=300)   # (method, path, what, status)
        self._cond = threading.Condition(threading.RLock())
        self._runs: dict[tuple[str, str, str], FakeRun] = {}
        self._seen: dict[tuple[str, str, str], _SeenHistory] = {}   # history as readers see it, per run
        self._artifacts: dict[str, FakeArtifact] = {}     # by artifact id
        self._manifest_owner: dict[str, str] = {}         # manifest id -> artifact id
        self._manifest_key: dict[str, str] = {}           # artifact id -> key of its last uploaded manifest
        self._blobs: dict[str, bytes] = {}                # upload key -> bytes
        self._multipart: dict[str, str] = {}              # multipart uploadID -> key of the whole file
        self.anomalies: list[str] = []                    # protocol oddities seen (gaps, rewrites, ...)
        self._fault = ("ok", "all")
        self._fault_run: str | None = None   # the fault applies to this run's file_stream only
        self._stopping = False
        self._ids = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ public API
    def start(self, port: int = 0) -> str:
        """Listen on `port` (0: any free one). A port chosen in advance lets a test point the SDK
        at an address where nothing listens yet: connection refused, until start()."""
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = _Server(("127.0.0.1", port), handler)
        self.base_url = "http://127.0.0.1:%d" % self._server.server_address[1]
        # stop() waits for the serve loop to see the shutdown: poll often, so that it does not wait 0.5 s
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fakewandb", daemon=True)
        self._thread.start()
        return self.base_url

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def env(self) -> dict:
        return {
            "WANDB_BASE_URL": self.base_url,
            "WANDB_API_KEY": self.api_key,
            "WANDB_ERROR_REPORTING": "false",   # no Sentry reports from the SDK
        }

    def set_fault(self, mode: str, paths: str = "all", run: str | None = None) -> None:
        assert mode in FAULT_MODES and paths in FAULT_PATHS, (mode, paths)
        assert run is None or paths == "file_stream", "a fault for one run applies to its file_stream only"
        with self._cond:
            self._fault = (mode, paths)
            self._fault_run = run
            self._cond.notify_all()

    def runs(self) -> dict[str, FakeRun]:
        with self._cond:
            return {run.run_id: copy.deepcopy(run) for run in self._runs.values()}

    def run(self, run_id: str) -> FakeRun:
        with self._cond:
            found = [run for run in self._runs.values() if run.run_id == run_id]
            assert found, "no run %r; runs: %s" % (run_id, sorted(run.run_id for run in self._runs.values()))
            return copy.deepcopy(found[0])

    def history_rows(self) -> dict[str, int]:
        """Rows of history held per run id (cheap: copies nothing; for progress while a backlog drains)."""
        with self._cond:
            return {run.run_id: len(run.history) for run in self._runs.values()}

    def overwrites(self) -> int:
        """History lines placed over a different line, over all runs (rows W&B lost)."""
        with self._cond:
            return sum(run.overwrites for run in self._runs.values())

    def complete(self, run_id: str) -> bool:
        """True once the run exists and its finish arrived (cheap: copies nothing)."""
        with self._cond:
            return any(run.run_id == run_id and run.complete for run in self._runs.values())

    def artifacts(self) -> list[FakeArtifact]:
        with self._cond:
            return [copy.deepcopy(a) for a in self._artifacts.values() if a.committed]

    def wait_for(self, predicate: Callable[["FakeWandb"], bool] | Callable[[], bool], timeout: float) -> None:
        """Wait until predicate(fake) (or predicate()) is true; it is re-checked on every change."""
        takes_fake = len(inspect.signature(predicate).parameters) > 0
        check = (lambda: predicate(self)) if takes_fake else predicate
        with self._cond:
            if not self._cond.wait_for(check, timeout):
                raise AssertionError("fakewandb: condition %s not met within %.1f s\n%s" % (
                    getattr(predicate, "__name__", predicate), timeout, self.describe()))

    def describe(self) -> str:
        with self._cond:
            lines = ["requests: %s" % dict(self.requests_seen), "fault: %s/%s" % self._fault]
            for run in self._runs.values():
                lines.append("run %s/%s/%s: %d history rows (%d counted, %d overwritten), complete=%s exit=%s "
                             "summary keys=%s" % (run.entity, run.project, run.run_id, len(run.history),
                                                  len(self._seen_history(run)), run.overwrites, run.complete,
                                                  run.exit_code, sorted(run.summary)))
            for art in self._artifacts.values():
                lines.append("artifact %s:%s committed=%s files=%s" % (art.name, art.type, art.committed,
                                                                      sorted(art.files)))
            lines.extend("anomaly: %s" % a for a in self.anomalies[-10:])
            lines.append("last requests: %s" % list(self.request_log)[-15:])
            return "\n".join(lines)

    # ------------------------------------------------------------------ internals
    def _new_id(self, prefix: str) -> str:
        with self._cond:
            self._ids += 1
            return "%s-%d" % (prefix, self._ids)

    def _upload_url(self, key: str) -> str:
        return "%s/upload/%s" % (self.base_url, quote(key, safe="/"))

    def _seen_record(self, run: FakeRun) -> _SeenHistory:
        return self._seen.setdefault((run.entity, run.project, run.name), _SeenHistory())

    def _seen_history(self, run: FakeRun) -> list:
        """The run's history as W&B's readers see it now: every line that arrived `lag` seconds ago."""
        seen = self._seen_record(run)
        horizon = time.monotonic() - self.lag
        while seen.unseen and seen.unseen[0][0] <= horizon:
            _, offset, content = seen.unseen.popleft()
            _place(seen.lines, offset, content)
        return seen.lines

    def _find_run(self, entity, project, name, storage_id=None) -> FakeRun | None:
        if storage_id:
            for run in self._runs.values():
                if run.storage_id == storage_id:
                    return run
        return self._runs.get((entity or self.entity, project or "uncategorized", name))

    # -- GraphQL ---------------------------------------------------------------
    def _graphql(self, op: str, v: dict) -> dict:
        handler = getattr(self, "_gql_" + op, None)
        if handler is None:
            raise _GraphQLError("fakewandb does not emulate GraphQL operation %r" % op)
        with self._cond:
            data = handler(v)
            self._cond.notify_all()
            return data

    def _gql_Viewer(self, v):
        return {"viewer": {"id": "viewer-1", "entity": self.entity, "username": self.entity,
                           "email": "fake@example.invalid", "flags": "{}", "admin": False,
                           "teams": {"edges": []}}}

    def _gql_ServerInfo(self, v):
        # No optional features: the SDK then uses its plain code paths.
        return {"serverInfo": {"features": [], "cliVersionInfo": {}, "latestLocalVersionInfo": None}}

    _gql_ServerFeaturesQuery = _gql_ServerInfo

    def _gql_OrganizationCoreWeaveOrganizationID(self, v):   # system-metrics probe; not CoreWeave
        return {"entity": {"organization": None}}

    def _gql_UpsertBucket(self, v):
        entity, project = v.get("entity") or self.entity, v.get("project") or "uncategorized"
        run = self._find_run(entity, project, v.get("name"), v.get("id"))
        inserted = run is None
        if run is None:
            name = v.get("name") or self._new_id("run")
            run = FakeRun(run_id=name, entity=entity, project=project, name=name,
                          storage_id="storage-%s-%s-%s" % (entity, project, name))
            self._runs[(entity, project, name)] = run
        # UpsertBucket only changes what it is given.
        if v.get("displayName") is not None:
            run.display_name = v["displayName"]
        if v.get("groupName") is not None:
            run.group = v["groupName"]
        if v.get("tags") is not None:
            run.tags = list(v["tags"])
        if v.get("notes") is not None:
            run.notes = v["notes"]
        for key, attribute in (("host", "host"), ("program", "program"), ("commit", "commit"), ("repo", "repo")):
            if v.get(key) is not None:
                setattr(run, attribute, v[key])
        if v.get("config") is not None:
            run.raw_config = json.loads(v["config"])
            run.config = _unwrap_config(run.raw_config)
        if v.get("summaryMetrics") is not None:
            run.summary.update(json.loads(v["summaryMetrics"]))
        return {"upsertBucket": {"inserted": inserted, "bucket": {
            "id": run.storage_id, "name": run.name, "displayName": run.display_name,
            "description": run.notes, "config": json.dumps(run.raw_config), "sweepName": None,
            "historyLineCount": len(self._seen_history(run)),
            "project": {"id": "project-%s" % run.project, "name": run.project,
                        "entity": {"id": "entity-%s" % run.entity, "name": run.entity}}}}}

    def _gql_RelayServerStep(self, v):
        # The relay's own mid-run query: how many history lines the server holds for a run.
        run = self._find_run(v.get("entity"), v.get("project"), v.get("name"))
        return {"model": {"bucket": {"historyLineCount": len(self._seen_history(run))} if run else None}}

    def _gql_RunResumeStatus(self, v):
        run = self._find_run(v.get("entity"), v.get("project"), v.get("name"))
        if run is None:
            return {"model": {"id": "project-x", "name": v.get("project"),
                              "entity": {"id": "entity-x", "name": v.get("entity") or self.entity},
                              "bucket": None}}
        # How wandb-core 0.31 (runbranch/resume.go) uses this answer:
        # - the run exists only if `wandbConfig` (config["_wandb"] filtered to key "t") has "t";
        #   otherwise resume="allow" starts it afresh and resume="must" fails;
        # - file_stream continues at offsets historyLineCount / eventsLineCount / logLineCount;
        # - starting step = integer "_step" of the LAST historyTail row (summaryMetrics["_step"] is
        #   used only when historyTail is empty), plus 1 when historyLineCount > 0. It is stored in
        #   the run dir's run-<id>.wandb.syncstate and returned as run.starting_step. run.step reads
        #   0 until the first log() after init, and log(step=s) with s below it is dropped silently;
        # - config (each value as {"value": v}), summaryMetrics, tags and notes are restored, and
        #   every one of these fields must be present and parse, or resuming fails.
        # A finished or preempted run that wandb.init resumes is running again, until its next finish.
        run.complete, run.exit_code, run.preempting = False, None, False
        wandb_internal = run.raw_config.get("_wandb", {})
        wandb_internal = wandb_internal.get("value", {}) if isinstance(wandb_internal, dict) else {}
        seen = self._seen_history(run)
        history = [row for row in seen if row is not None]
        events = [row for row in run.events if row is not None]
        return {"model": {
            "id": "project-%s" % run.project, "name": run.project,
            "entity": {"id": "entity-%s" % run.entity, "name": run.entity},
            "bucket": {
                "id": run.storage_id, "name": run.name, "displayName": run.display_name,
                "summaryMetrics": json.dumps(run.summary, allow_nan=True),
                "logLineCount": len(run.console), "historyLineCount": len(seen),
                "eventsLineCount": len(run.events),
                "historyTail": json.dumps([json.dumps(row, allow_nan=True) for row in history[-10:]]),
                "eventsTail": json.dumps([json.dumps(row, allow_nan=True) for row in events[-10:]]),
                "config": json.dumps(run.raw_config, allow_nan=True), "notes": run.notes,
                "tags": list(run.tags),
                "wandbConfig": json.dumps({k: wandb_internal[k] for k in ("t",) if k in wandb_internal}),
                "runInfo": None}}}

    def _gql_CreateRunFiles(self, v):
        run = self._find_run(v.get("entity"), v.get("project"), v.get("run"))
        storage = run.storage_id if run else "unknown"
        return {"createRunFiles": {"runID": storage, "uploadHeaders": [], "files": [
            {"name": name, "uploadUrl": self._upload_url("run/%s/%s" % (storage, name))}
            for name in v.get("files", [])]}}

    def _collection(self, entity, project, name) -> list[FakeArtifact]:
        """Committed versions of an artifact collection, oldest first."""
        return sorted((a for a in self._artifacts.values() if a.committed and a.name == name
                       and (a.entity, a.project) == (entity, project)), key=lambda a: a.version)

    def _move_aliases(self, art: FakeArtifact) -> None:
        """An alias names one version of a collection: taking it takes it from the others."""
        for other in self._collection(art.entity, art.project, art.name):
            if other is not art:
                other.aliases = [a for a in other.aliases if a not in art.aliases]

    def _gql_ArtifactType(self, v):   # asked by the Python side of log_artifact
        entity, project = v.get("entity") or self.entity, v.get("project") or "uncategorized"
        versions = self._collection(entity, project, v["name"].split(":")[0])
        artifact = {"artifactType": {"name": versions[-1].type}} if versions else None
        return {"project": {"artifact": artifact}}

    def _gql_CreateArtifact(self, v):
        spec = v["input"]
        entity, project = spec.get("entityName") or self.entity, spec.get("projectName") or "uncategorized"
        name, aliases = spec["artifactCollectionName"], [a["alias"] for a in spec.get("aliases") or []]
        versions = self._collection(entity, project, name)
        latest = {"id": versions[-1].id} if versions else None
        # A resent CreateArtifact (same clientID) gets the artifact it already created.
        art = next((a for a in self._artifacts.values() if a.client_id and a.client_id == spec.get("clientID")), None)
        if art is None and spec.get("enableDigestDeduplication"):
            # Same content as a committed version: the SDK skips the upload and no version is added.
            art = next((a for a in versions if a.digest == spec.get("digest")), None)
            if art is not None:
                self.requests_seen["artifact_deduplicated"] += 1
                art.aliases += [a for a in aliases if a not in art.aliases]
                self._move_aliases(art)
        if art is None:
            run = self._find_run(entity, project, spec.get("runName"))
            metadata = spec.get("metadata")
            art = FakeArtifact(
                name=name, type=spec.get("artifactTypeName"),
                metadata=json.loads(metadata) if isinstance(metadata, str) else (metadata or {}),
                aliases=aliases, files={}, run_id=run.run_id if run else spec.get("runName"),
                id=self._new_id("artifact"), entity=entity, project=project, digest=spec.get("digest"),
                client_id=spec.get("clientID"))
            self._artifacts[art.id] = art
        return {"createArtifact": {"artifact": {
            "id": art.id, "state": "COMMITTED" if art.committed else "PENDING",
            "artifactSequence": {"latestArtifact": latest}}}}

    def _gql_FetchArtifactDigestAlgorithm(self, v):
        return {"project": None}   # no collection settings: the SDK uses MD5 manifests

    def _gql_XXHashDigestsEnabled(self, v):
        return {"entity": {"xxhashDigestsEnabled": False}}

    def _manifest_payload(self, field_name: str, manifest_id: str, v: dict) -> dict:
        file = {"id": "file-" + manifest_id}
        if v.get("includeUpload"):
            file.update(uploadUrl=self._upload_url("manifest/%s/%s" % (self._manifest_owner[manifest_id],
                                                                        manifest_id)), uploadHeaders=[])
        return {field_name: {"artifactManifest": {"id": manifest_id, "file": file}}}

    # The SDK creates a manifest record first without an upload URL (to get an ID for
    # CreateArtifactFiles), then, after the files, creates (or, with a base artifact, updates) one
    # with an upload URL and PUTs wandb_manifest.json there. CommitArtifact reads the last one.
    def _gql_CreateArtifactManifest(self, v):
        manifest_id = self._new_id("manifest")
        self._manifest_owner[manifest_id] = v["artifactID"]
        return self._manifest_payload("createArtifactManifest", manifest_id, v)

    def _gql_UpdateArtifactManifest(self, v):
        return self._manifest_payload("updateArtifactManifest", v["artifactManifestID"], v)

    def _gql_CreateArtifactFiles(self, v):
        edges = []
        for spec in v.get("artifactFiles") or v.get("input", {}).get("artifactFiles", []):
            key = "artifact/%s/%s" % (spec["artifactID"], spec["name"])
            node = {"storagePath": key, "uploadUrl": self._upload_url(key), "uploadHeaders": [],
                    "uploadMultipartUrls": None, "artifact": {"id": spec["artifactID"]}}
            parts = spec.get("uploadPartsInput")
            if parts:   # multipart (files >= 2 GiB in 0.31): one URL per part
                upload_id = self._new_id("multipart")
                self._multipart[upload_id] = key
                node["uploadMultipartUrls"] = {"uploadID": upload_id, "uploadUrlParts": [
                    {"partNumber": p["partNumber"],
                     "uploadUrl": self._upload_url("part/%s/%d" % (upload_id, p["partNumber"]))}
                    for p in parts]}
            edges.append({"node": node})
        return {"createArtifactFiles": {"files": {"edges": edges}}}

    def _gql_CompleteMultipartUploadArtifact(self, v):
        key = self._multipart[v["uploadID"]]
        numbers = sorted(p["partNumber"] for p in v["completedParts"])
        data = b"".join(self._blobs["part/%s/%d" % (v["uploadID"], n)] for n in numbers)
        self._blobs[key] = data
        return {"completeMultipartUploadArtifact": {"digest": hashlib.md5(data).hexdigest()}}

    def _gql_CommitArtifact(self, v):
        art = self._artifacts[v["artifactID"]]
        if not art.committed:
            manifest = json.loads(self._blobs.get(self._manifest_key.get(art.id), b"{}") or b"{}")
            # Manifest entries name content by base64 MD5: take this artifact's uploads first, then
            # any upload (W&B stores content once, so an entry may point at an earlier upload).
            by_md5 = {}
            for key, data in self._blobs.items():
                md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
                if md5 not in by_md5 or key.startswith("artifact/%s/" % art.id):
                    by_md5[md5] = data
            for path, entry in (manifest.get("contents") or {}).items():
                if entry.get("digest") in by_md5:
                    art.files[path] = by_md5[entry["digest"]]
                else:
                    self.anomalies.append("artifact %s: no uploaded bytes for %s" % (art.name, path))
            art.manifest, art.committed = manifest, True
            art.version = len(self._collection(art.entity, art.project, art.name)) - 1
            self._move_aliases(art)
        return {"commitArtifact": {"artifact": {"id": art.id, "digest": art.digest}}}

    def _gql_ArtifactByID(self, v):   # asked by Artifact.wait() after the save
        art = self._artifacts.get(v["id"])
        if art is None:
            return {"artifact": None}
        project = {"id": "project-" + art.project, "internalId": "1", "name": art.project,
                   "entity": {"name": art.entity}}
        collection = {"__typename": "ArtifactSequence", "name": art.name, "project": project}
        return {"artifact": {
            "__typename": "Artifact", "id": art.id, "artifactSequence": collection,
            "versionIndex": art.version if art.committed else None, "artifactType": {"name": art.type},
            "description": None, "metadata": json.dumps(art.metadata), "ttlDurationSeconds": -2,
            "ttlIsInherited": True, "tags": [], "historyStep": None,
            "state": "COMMITTED" if art.committed else "PENDING",
            "size": sum(len(b) for b in art.files.values()), "digest": art.digest,
            "digestAlgorithm": "MANIFEST_MD5", "commitHash": (art.digest or "")[:12],
            "fileCount": len(art.files), "createdAt": "2024-01-01T00:00:00", "updatedAt": None,
            "aliases": [{"__typename": "ArtifactAlias", "id": "alias-%s-%s" % (art.id, alias), "alias": alias,
                         "artifactCollection": dict(collection, __typename="ArtifactSequence")}
                        for alias in art.aliases]}}

    def _gql_UseArtifact(self, v):
        return {"useArtifact": {"artifact": {"id": v.get("input", {}).get("artifactID")}}}

    # -- file_stream and uploads --------------------------------------------------
    def _file_stream(self, entity: str, project: str, run_id: str, body: dict) -> dict:
        with self._cond:
            run = self._find_run(entity, project, run_id)
            if run is None:   # the real server 404s; the SDK always upserts first
                raise _HTTPError(404, "no run %s/%s/%s" % (entity, project, run_id))
            run.file_stream_posts += 1
            run.post_times.append(time.time())
            for name, chunk in (body.get("files") or {}).items():
                offset, content = chunk["offset"], chunk["content"]
                if name == HISTORY:
                    lines = [json.loads(line) for line in content]
                    now = time.time()  # a line's first arrival counts (a resent chunk keeps it)
                    _place(run.arrived, offset, [run.arrived[offset + i] if offset + i < len(run.arrived)
                                                 and run.arrived[offset + i] is not None else now
                                                 for i in range(len(lines))])
                    run.overwrites += sum(1 for i, line in enumerate(lines[:max(0, len(run.history) - offset)])
                                          if not _same_line(run.history[offset + i], line))
                    _place(run.history, offset, lines, self.anomalies, "%s history" % run_id)
                    self._seen_record(run).unseen.append((time.monotonic(), offset, lines))
                elif name == EVENTS:
                    _place(run.events, offset, [json.loads(line) for line in content], self.anomalies,
                           "%s events" % run_id)
                elif name == SUMMARY:
                    if content:
                        run.summary = json.loads(content[-1])
                elif name == OUTPUT:
                    _place(run.console, offset, list(content))
            if body.get("preempting"):
                run.preempting = True
            if body.get("complete"):
                run.complete = True
                run.exit_code = body.get("exitcode")
            self._cond.notify_all()
        return {"exitcode": None, "limits": {}}

    def _upload(self, key: str, data: bytes) -> None:
        with self._cond:
            self._blobs[key] = data
            if key.startswith("manifest/"):
                self._manifest_key[key.split("/")[1]] = key
            if key.startswith("run/"):
                _, storage, name = key.split("/", 2)
                for run in self._runs.values():
                    if run.storage_id == storage:
                        run.files[name] = data
            self._cond.notify_all()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Connections not yet accepted that the kernel keeps (socketserver's default is 5). With hundreds of
    # runs starting at once, a full queue drops SYNs and the client's TCP retries back off for a
    # minute: W&B's own servers keep long queues, and so does this one.
    request_queue_size = 1024

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):   # clients do go away
            super().handle_error(request, client_address)


class _ClientGone(Exception):
    """The request's body ended before its Content-Length: nothing to process, no one to answer."""


class _GraphQLError(Exception):
    pass


class _HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive, as the Go client expects
    fake: FakeWandb

    def log_message(self, fmt, *args):   # quiet; see FAKEWANDB_DEBUG
        pass

    def do_GET(self):
        self._handle()

    def do_POST(self):
        self._handle()

    def do_PUT(self):
        self._handle()

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            body = b"".join(chunks)
        else:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            if len(body) < length:  # the client died while sending (a relay stopped mid-upload)
                raise _ClientGone("%d of %d bytes" % (len(body), length))
        if self.headers.get("Content-Encoding", "").lower() == "gzip":
            body = gzip.decompress(body)
        return body

    def _handle(self):
        fake = self.fake
        path = self.path.split("?", 1)[0]
        if path == "/graphql":
            kind = "graphql"
        elif path.startswith("/files/") and path.endswith("/file_stream"):
            kind = "file_stream"
        elif path.startswith("/upload/"):
            kind = "upload"
        else:
            kind = "other"
        try:
            body = self._read_body()
        except _ClientGone:
            with fake._cond:
                fake.requests_seen["cut off by the client"] += 1
            self.close_connection = True
            return
        what = kind
        if kind == "graphql":
            try:
                request = json.loads(body)
            except ValueError:
                request = {}
            op = request.get("operationName") or ""
            if not op:
                match = re.search(r"\b(?:query|mutation)\s+(\w+)", request.get("query") or "")
                op = match.group(1) if match else "anonymous"
            what = "graphql:" + op
        with fake._cond:
            fake.requests_seen[kind] += 1
            if what != kind:
                fake.requests_seen[what] += 1
            mode, paths = fake._fault
            run_of = unquote(path.split("/")[4]) if kind == "file_stream" else None  # /files/e/p/RUN/file_stream
            other_run = fake._fault_run is not None and run_of != fake._fault_run
            if mode != "ok" and not other_run and (paths in ("all", kind)
                                                   or (paths == "run_init" and what in RUN_INIT)):
                fake.requests_seen["fault:" + mode] += 1
            else:
                mode = "ok"
        if mode == "503":
            return self._reply(503, {"error": "fakewandb: injected 503"}, what)
        if mode == "reset":
            return self._reset(what)
        if mode == "hang":
            return self._hang(what)
        try:
            if kind == "graphql":
                variables = request.get("variables") or {}
                if os.environ.get("FAKEWANDB_DEBUG"):
                    print("fakewandb %s vars=%s" % (what, json.dumps(variables)[:2000]), file=sys.stderr)
                try:
                    payload = {"data": fake._graphql(what.split(":", 1)[1], variables)}
                except _GraphQLError as error:
                    payload = {"data": None, "errors": [{"message": str(error)}]}
            elif kind == "file_stream":
                parts = path.split("/")   # "", files, entity, project, run, file_stream
                request = json.loads(body)
                if os.environ.get("FAKEWANDB_DEBUG"):
                    print("fakewandb %s %s" % (path, json.dumps(request)[:2000]), file=sys.stderr)
                payload = fake._file_stream(unquote(parts[2]), unquote(parts[3]), unquote(parts[4]), request)
            elif kind == "upload":
                fake._upload(unquote(path[len("/upload/"):]), body)
                payload = None
            else:
                raise _HTTPError(404, "fakewandb: no such endpoint")
        except _HTTPError as error:
            return self._reply(error.status, {"error": str(error)}, what)
        if mode == "lost_reply":
            return self._reset(what)
        self._reply(200, payload, what)

    def _reply(self, status: int, payload: Any, what: str) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self._log(what, status)

    def _reset(self, what: str) -> None:
        """Close the connection with a TCP RST and no response."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self._log(what, "reset")

    def _hang(self, what: str) -> None:
        """Hold the request unanswered until the fault is cleared, the client leaves, or stop()."""
        fake, sock = self.fake, self.connection
        self._log(what, "hang")
        with fake._cond:
            while fake._fault[0] == "hang" and not fake._stopping:
                readable, _, _ = select.select([sock], [], [], 0)
                if readable and not sock.recv(1, socket.MSG_PEEK):
                    break   # the client closed its end
                fake._cond.wait(0.2)   # the lock is released while waiting
        self.close_connection = True   # closed unanswered

    def _log(self, what: str, status) -> None:
        fake = self.fake
        with fake._cond:
            fake.request_log.append((self.command, self.path, what, status))
            fake._cond.notify_all()
        if os.environ.get("FAKEWANDB_DEBUG"):
            print("fakewandb %s %s %s -> %s" % (self.command, self.path, what, status), file=sys.stderr)
