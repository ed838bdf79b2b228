"""The relay's own questions to W&B, without the wandb SDK: where it is, which API key, and how many
history rows it holds for a run (one GraphQL query over urllib).

The uploader asks this before `wandb.init` (the probe: is W&B answering, and can its count be
trusted yet) and every `confirm_every` seconds of a run (what W&B holds leaves the spool). The
count is the field wandb-core itself reads when it resumes a run.
"""
from __future__ import annotations

import base64
import json
import netrc
import os
import urllib.error
import urllib.request
from urllib.parse import urlparse

from relay.errors import RelayError

# How many history rows W&B holds for a run (the field wandb-core itself reads when it resumes).
SERVER_STEP_QUERY = """query RelayServerStep($entity: String, $project: String!, $name: String!) {
  model(name: $project, entityName: $entity) { bucket(name: $name) { historyLineCount } }
}"""

# What a count query that failed raises (no answer, an HTTP error, an answer of another shape).
COUNT_ERRORS = (OSError, ValueError, KeyError, TypeError)


class Unreachable(RelayError, ConnectionError):
    """W&B did not answer the relay's own query (raised before wandb.init is tried)."""


def base_url() -> str:
    return os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"


def api_key() -> str | None:
    """The API key wandb would use: WANDB_API_KEY, or the netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    try:
        entry = netrc.netrc(os.environ.get("NETRC")).authenticators(urlparse(base_url()).hostname or "")
    except (OSError, netrc.NetrcParseError):
        return None
    return entry[2] if entry else None


def api_key_configured() -> bool:
    return api_key() is not None


def default_mode() -> str:
    return "online" if api_key_configured() else "offline"


def history_count(url: str, key: str, entity: str | None, project: str, run_id: str, timeout: float) -> int:
    """How many history rows W&B holds for a run (0 for a run it does not know)."""
    query = {"operationName": "RelayServerStep", "query": SERVER_STEP_QUERY,
             "variables": {"entity": entity, "project": project, "name": run_id}}
    token = base64.b64encode(("api:%s" % key).encode()).decode()
    request = urllib.request.Request(url.rstrip("/") + "/graphql", data=json.dumps(query).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": "Basic " + token})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        answer = json.load(response)
    bucket = answer["data"]["model"]["bucket"]
    return int(bucket["historyLineCount"] or 0) if bucket else 0


def probe(entity: str | None, project: str, run_id: str, timeout: float) -> int | None:
    """Raise Unreachable unless W&B answers (any answer but 5xx, 408 or 429 counts). Return its
    count of the run's history rows, or None if it answered without one (or no API key is
    configured: wandb.init will say what is missing)."""
    key = api_key()
    if key is None:
        return None
    try:
        return history_count(base_url(), key, entity, project, run_id, timeout)
    except urllib.error.HTTPError as exc:
        if exc.code >= 500 or exc.code in (408, 429):
            raise Unreachable("W&B at %s answered HTTP %d" % (base_url(), exc.code)) from None
    except (KeyError, TypeError):
        pass  # a GraphQL error (no such entity, no permission): W&B answers; wandb.init will say more
    except (OSError, ValueError) as exc:
        raise Unreachable("W&B at %s did not answer: %s" % (base_url(), short_error(exc))) from None
    return None


def short_error(error: BaseException) -> str:
    """An error in one line, as `relay status` shows it: its class, then the first line of its text
    (relay.metrics.error_kind reads the class back)."""
    text = str(error).strip().splitlines()
    return "%s: %s" % (type(error).__name__, text[0] if text else "")
