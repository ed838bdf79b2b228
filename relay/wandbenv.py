"""The W&B variables in the relay's environment, checked before `relay serve` starts.

The wandb SDK reads every WANDB_* variable into its settings when an uploader calls `wandb.init`,
and refuses a bad value there with a validation traceback: every run would fail, one after the
other, long after the relay started. `problem(environ)` finds those values first, so that `relay
serve` can refuse to start with one line naming the variable and what it may be. It checks what
the SDK validates and a relay could plausibly be given: the choices below, WANDB_BASE_URL (an
http(s) URL), flags (true/false), and an API key with spaces around it.
"""
from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

# variable -> the values the wandb SDK accepts (its Settings' Literal types)
CHOICES = {
    "WANDB_MODE": ("online", "offline", "disabled", "shared", "dryrun", "run"),
    "WANDB_CONSOLE": ("auto", "off", "wrap", "redirect", "wrap_raw", "wrap_emu"),
    "WANDB_RESUME": ("allow", "must", "never", "auto"),
}
FLAGS = ("WANDB_SILENT", "WANDB_QUIET")
# what pydantic reads as a bool (any case)
FLAG_VALUES = ("true", "false", "1", "0", "yes", "no", "on", "off", "t", "f", "y", "n")


def problem(environ: Mapping) -> str | None:
    """One line saying what is wrong with the first bad WANDB_* variable, or None."""
    for name, allowed in CHOICES.items():
        value = environ.get(name)
        if value is not None and value not in allowed:
            return "%s=%r is not a value W&B accepts: use one of %s, or unset it" % (name, value, ", ".join(allowed))
    url = environ.get("WANDB_BASE_URL")
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return ("WANDB_BASE_URL=%r is not a URL W&B accepts: use http(s)://HOST[:PORT] (e.g. "
                    "https://api.wandb.ai), or unset it" % url)
    for name in FLAGS:
        value = environ.get(name)
        if value is not None and value.lower() not in FLAG_VALUES:
            return "%s=%r is not a flag W&B accepts: use true or false, or unset it" % (name, value)
    key = environ.get("WANDB_API_KEY")
    if key is not None and key != key.strip():
        return "WANDB_API_KEY starts or ends with whitespace, which W&B refuses: remove it"
    return None
