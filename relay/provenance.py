"""Where and how a trainer runs, taken on its own node once per run: the `meta` record.

`collect()` is what in-process wandb puts in a run's metadata, read on the trainer's node:
    host, program, args, root (the working directory), executable, python, os, username, started_at
    cpu_count, cpu_count_logical, memory_total (bytes)
    torch, cuda_version: only when the trainer has imported torch already (sys.modules; never
                   imported here)
    gpu_type, gpu_count, gpus [{name, memory_total}]: from torch when it has initialised CUDA,
                   else from NVML when `pynvml` (nvidia-ml-py) is importable and finds a GPU
    git {commit, remote_url, root, dirty, diff_bytes, diff_left_out}: the checkout around the
                   working directory; commit and remote are read from the files in its .git
                   directory (HEAD, refs, packed-refs, config), the dirty flag and the diff
                   (`git diff HEAD`, as in-process wandb takes it) from one `git` subprocess
A field that cannot be read (no git, no repository, no GPU, no /proc) is absent; nothing here
raises. `validate` is the relay's check of a `meta` record (relay.protocol). `Provenance` runs `collect()` on a short-lived daemon thread, off the trainer's thread, and
hands the record to the run when it is ready (before the run's finish, or never).

This module must stay importable on Python 3.8 (IsaacGym environments).
"""
from __future__ import annotations

import getpass
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from relay.errors import ProtocolError

MAX_DIFF_BYTES = 60 * 1024     # a bigger diff is left out (its size is noted): the record's string limit is 64 KiB
GIT_TIMEOUT = 5.0              # seconds the `git diff` subprocess may take


def collect(argv: Optional[List[str]] = None, cwd: Optional[str] = None) -> Tuple[Dict[str, Any], Optional[str]]:
    """(provenance, diff or None) of this process: see the module's text."""
    argv = list(sys.argv if argv is None else argv)
    cwd = cwd or _quiet(os.getcwd) or ""
    found = {
        "host": _quiet(socket.gethostname),
        "program": os.path.abspath(argv[0]) if argv and argv[0] and argv[0] != "-c" else (argv[0] if argv else None),
        "args": argv[1:],
        "root": cwd,
        "executable": sys.executable or None,
        "python": platform.python_version(),
        "os": _os_name(),
        "username": _quiet(getpass.getuser),
        "started_at": time.time(),
        "cpu_count": _physical_cpus(),
        "cpu_count_logical": os.cpu_count(),
        "memory_total": _memory_total(),
    }  # type: Dict[str, Any]
    found.update(_torch_and_gpus())
    git, diff = git_provenance(cwd) if cwd else ({}, None)
    if git:
        found["git"] = git
    return {key: value for key, value in found.items() if value is not None}, diff


class Provenance(threading.Thread):
    """Collects the provenance on a daemon thread and hands `submit(message)` the `meta` record.
    `submit` returns False when the run no longer takes it (finished meanwhile)."""

    def __init__(self, run_id: str, submit: Callable[[Dict[str, Any]], bool]):
        super().__init__(name="relay-provenance", daemon=True)
        self.run_id = run_id
        self.submit = submit

    def run(self) -> None:
        try:
            provenance, diff = collect()
        except Exception as exc:  # never the trainer's problem: the run goes on without its provenance
            provenance, diff = {"error": "provenance not collected: %s: %s" % (type(exc).__name__, exc)}, None
        message = {"t": "meta", "run": self.run_id, "provenance": provenance}
        if diff is not None:
            message["diff"] = diff
        self.submit(message)


# -- the `meta` record as the relay checks it (relay.protocol.validate) ------------------------------

# A `meta` record's provenance fields the relay reads, and their types (others are kept unchecked).
PROVENANCE_FIELDS = {
    "host": str, "program": str, "args": list, "root": str, "executable": str, "python": str, "os": str,
    "username": str, "started_at": float, "cpu_count": int, "cpu_count_logical": int, "memory_total": int,
    "torch": str, "cuda_version": str, "gpu_type": str, "gpu_count": int, "gpus": list, "git": dict,
}
GIT_FIELDS = {"commit": str, "remote_url": str, "root": str, "dirty": bool, "diff_bytes": int, "diff_left_out": str}


def validate(message: Dict[str, Any]) -> None:
    """A `meta` record: `provenance` a map of known fields of the right types, `diff` a string."""
    found = message.get("provenance")
    if not isinstance(found, dict):
        raise ProtocolError("field 'provenance' must be dict, got %s" % type(found).__name__)
    if message.get("diff") is not None and not isinstance(message["diff"], str):
        raise ProtocolError("field 'diff' must be str, got %s" % type(message["diff"]).__name__)
    for fields, where, values in ((PROVENANCE_FIELDS, "provenance", found),
                                  (GIT_FIELDS, "provenance.git", found.get("git") or {})):
        for key, kind in fields.items():
            value = values.get(key)
            wanted = (int, float) if kind is float else kind
            if value is not None and (not isinstance(value, wanted) or (kind is not bool and isinstance(value, bool))):
                raise ProtocolError("field %s.%s must be %s, got %s"
                                    % (where, key, kind.__name__, type(value).__name__))
    if not all(isinstance(arg, str) for arg in found.get("args") or []):
        raise ProtocolError("field provenance.args must be a list of strings")
    for gpu in found.get("gpus") or []:
        memory = gpu.get("memory_total", 0) if isinstance(gpu, dict) else None
        if not isinstance(gpu, dict) or not isinstance(gpu.get("name"), str) or type(memory) is not int:
            raise ProtocolError("field provenance.gpus must be a list of {name: str, memory_total: int}")


# -- git, from the .git directory's files --------------------------------------------------------

def git_provenance(cwd: str, timeout: float = GIT_TIMEOUT) -> Tuple[Dict[str, Any], Optional[str]]:
    """({commit, remote_url, root, dirty, ...}, diff) of the checkout around `cwd`; ({}, None) when
    there is none. A missing `git` or one that takes too long leaves out dirty and the diff."""
    found = find_git_dir(cwd)
    if found is None:
        return {}, None
    root, git_dir, common_dir = found
    info = {"root": root, "commit": head_commit(git_dir, common_dir),
            "remote_url": remote_url(common_dir)}  # type: Dict[str, Any]
    diff = None
    git = shutil.which("git")
    if git is None:
        return {key: value for key, value in info.items() if value is not None}, None
    try:
        # close_fds=False and a full path let Python use posix_spawn (no fork of the trainer's memory)
        done = subprocess.run([git, "-C", root, "diff", "HEAD", "--no-color", "--no-ext-diff"], close_fds=False,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                              timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        info["diff_left_out"] = "git diff failed: %s" % exc
    else:
        if done.returncode == 0:
            info["dirty"] = bool(done.stdout)
            info["diff_bytes"] = len(done.stdout)
            if len(done.stdout) > MAX_DIFF_BYTES:
                info["diff_left_out"] = "%d bytes, over the %d-byte limit" % (len(done.stdout), MAX_DIFF_BYTES)
            elif done.stdout:
                diff = done.stdout.decode("utf-8", errors="replace")
        else:
            info["diff_left_out"] = "git diff exited with %d" % done.returncode
    return {key: value for key, value in info.items() if value is not None}, diff


def find_git_dir(start: str) -> Optional[Tuple[str, str, str]]:
    """(work tree root, git dir, common dir) of the checkout holding `start`, or None. A `.git`
    file (worktrees, submodules) points at the git dir; a `commondir` file there at the shared one."""
    path = os.path.abspath(start)
    while True:
        dot_git = os.path.join(path, ".git")
        if os.path.isdir(dot_git):
            git_dir = dot_git
            break
        if os.path.isfile(dot_git):
            text = _read(dot_git) or ""
            if not text.startswith("gitdir:"):
                return None
            git_dir = os.path.normpath(os.path.join(path, text[len("gitdir:"):].strip()))
            break
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    common = _read(os.path.join(git_dir, "commondir"))
    common_dir = os.path.normpath(os.path.join(git_dir, common.strip())) if common else git_dir
    return path, git_dir, common_dir


def head_commit(git_dir: str, common_dir: str) -> Optional[str]:
    """The commit HEAD names: a detached hash, or its branch's loose ref, or packed-refs."""
    head = (_read(os.path.join(git_dir, "HEAD")) or "").strip()
    if not head.startswith("ref:"):
        return head or None
    ref = head[len("ref:"):].strip()
    for directory in (git_dir, common_dir):
        value = (_read(os.path.join(directory, ref)) or "").strip()
        if value:
            return value
    for line in (_read(os.path.join(common_dir, "packed-refs")) or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1] == ref and not line.startswith(("#", "^")):
            return parts[0]
    return None  # a new repository without commits


def remote_url(common_dir: str) -> Optional[str]:
    """The url of remote "origin" in the repository's config, else of the first remote."""
    urls = {}  # type: Dict[str, str]
    section = None  # type: Optional[str]
    for raw in (_read(os.path.join(common_dir, "config")) or "").splitlines():
        line = raw.strip()
        if line.startswith("["):
            head = line.strip("[]").strip()
            section = head[len("remote"):].strip().strip('"') if head.startswith("remote ") else None
        elif section is not None and "=" in line:
            key, value = (part.strip() for part in line.split("=", 1))
            if key.lower() == "url":
                urls.setdefault(section, value)
    return urls.get("origin") or next(iter(urls.values()), None)


# -- the machine ---------------------------------------------------------------------------------

def _torch_and_gpus() -> Dict[str, Any]:
    found = {}  # type: Dict[str, Any]
    torch = sys.modules.get("torch")
    if torch is not None:
        found["torch"] = getattr(torch, "__version__", None)
        found["cuda_version"] = getattr(getattr(torch, "version", None), "cuda", None)
        try:
            if torch.cuda.is_initialized():
                count = torch.cuda.device_count()
                gpus = [{"name": torch.cuda.get_device_name(i),
                         "memory_total": int(torch.cuda.get_device_properties(i).total_memory)} for i in range(count)]
                found.update(_gpus(gpus))
                return found
        except Exception:
            pass
    found.update(_gpus(nvml_gpus()))
    return found


def _gpus(gpus: List[Dict[str, Any]]) -> Dict[str, Any]:
    if not gpus:
        return {}
    return {"gpus": gpus, "gpu_count": len(gpus), "gpu_type": gpus[0]["name"]}


def nvml_gpus() -> List[Dict[str, Any]]:
    """[{name, memory_total}] of the GPUs NVML sees; [] without pynvml, a driver or a GPU."""
    try:
        import pynvml  # optional: nvidia-ml-py
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:
        return []
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            gpus.append({"name": name.decode() if isinstance(name, bytes) else str(name),
                         "memory_total": int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)})
        return gpus
    except Exception:
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _memory_total() -> Optional[int]:
    from relay.sysmetrics import parse_meminfo  # the one reading of /proc/meminfo

    text = _read("/proc/meminfo")
    if text:
        return parse_meminfo(text).get("total")
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _physical_cpus() -> Optional[int]:
    """Cores (not hardware threads), from /proc/cpuinfo's (physical id, core id) pairs."""
    cores = set()
    physical = None
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            physical = value.strip()
        elif key == "core id":
            cores.add((physical, value.strip()))
    return len(cores) or None


def _os_name() -> str:
    uname = os.uname() if hasattr(os, "uname") else None
    if uname is None:
        return platform.system()
    return "%s-%s-%s" % (uname.sysname, uname.release, uname.machine)


def _read(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return None


def _quiet(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except Exception:
        return None
