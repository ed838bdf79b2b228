"""System metrics of the trainer's node, sampled off the trainer's thread: the `system` record.

Named as wandb 0.31 names its own (W&B shows them, prefixed `system.`, in the run's system charts):
    cpu                       the trainer process's CPU %, over the interval, divided by the CPU count
    proc.cpu.threads          the trainer process's threads
    proc.memory.rssMB         the trainer process's resident memory, MiB
    proc.memory.percent       that, in % of the node's memory
    proc.memory.availableMB   the node's available memory, MiB
    memory_percent            the node's memory in use, %
    gpu.{i}.gpu, gpu.{i}.memory              utilisation of GPU i and of its memory bus, %
    gpu.{i}.memoryAllocated, gpu.{i}.memoryAllocatedBytes   its memory in use, % and bytes
    gpu.{i}.temp, gpu.{i}.powerWatts, gpu.{i}.enforcedPowerLimitWatts, gpu.{i}.powerPercent
The process and memory values come from /proc (Linux; elsewhere they are absent), the GPU ones from
NVML when `pynvml` (nvidia-ml-py) is importable and finds a GPU. Nothing here raises: a value that
cannot be read is left out of the sample.

`Sampler` is a daemon thread that takes a sample every `interval` seconds (the first one interval
after the run starts, as in-process wandb does) and hands it to the run; the run's finish stops it.

This module must stay importable on Python 3.8 (IsaacGym environments).
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable, Dict, List, Optional

MiB = 1024 * 1024


def parse_meminfo(text: str) -> Dict[str, int]:
    """/proc/meminfo -> {"total", "available"} in bytes (those of its lines that are there)."""
    found = {}  # type: Dict[str, int]
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        name = {"MemTotal": "total", "MemAvailable": "available"}.get(key.strip())
        parts = rest.split()
        if name and parts and parts[0].isdigit():
            found[name] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return found


def parse_status(text: str) -> Dict[str, int]:
    """/proc/<pid>/status -> {"rss" (bytes), "threads"} (those of its lines that are there)."""
    found = {}  # type: Dict[str, int]
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if not parts or not parts[0].isdigit():
            continue
        if key == "VmRSS":
            found["rss"] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
        elif key == "Threads":
            found["threads"] = int(parts[0])
    return found


def parse_cpu_ticks(text: str) -> int:
    """/proc/<pid>/stat -> the process's utime + stime, in clock ticks. The command name (field 2)
    is in parentheses and may hold spaces and parentheses itself: fields are counted after the last ')'."""
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])   # fields 14 and 15 of proc(5), counted from 1


def memory_values(meminfo: Dict[str, int], status: Dict[str, int]) -> Dict[str, float]:
    values = {}  # type: Dict[str, float]
    total, available = meminfo.get("total"), meminfo.get("available")
    if total and available is not None:
        values["memory_percent"] = 100.0 * (total - available) / total
        values["proc.memory.availableMB"] = available / MiB
    if "rss" in status:
        values["proc.memory.rssMB"] = status["rss"] / MiB
        if total:
            values["proc.memory.percent"] = 100.0 * status["rss"] / total
    if "threads" in status:
        values["proc.cpu.threads"] = float(status["threads"])
    return values


class ProcReader:
    """The /proc half of a sample: CPU % since the previous sample, memory now."""

    def __init__(self, pid: Optional[int] = None, clock: Callable[[], float] = time.monotonic):
        self.base = "/proc/%s" % (pid or "self")
        self.clock = clock
        self.ticks_per_second = _sysconf("SC_CLK_TCK") or 100
        self.cpus = os.cpu_count() or 1
        self._last = self._cpu()   # (time, ticks) or None

    def sample(self) -> Dict[str, float]:
        values = memory_values(parse_meminfo(_read("/proc/meminfo") or ""),
                               parse_status(_read(self.base + "/status") or ""))
        now = self._cpu()
        if now is not None and self._last is not None and now[0] > self._last[0]:
            busy = (now[1] - self._last[1]) / self.ticks_per_second
            values["cpu"] = max(0.0, 100.0 * busy / (now[0] - self._last[0]) / self.cpus)
        self._last = now or self._last
        return values

    def _cpu(self):
        text = _read(self.base + "/stat")
        try:
            return (self.clock(), parse_cpu_ticks(text)) if text else None
        except (ValueError, IndexError):
            return None


class NvmlReader:
    """The GPU half of a sample, through NVML; `available` is False without pynvml or a GPU."""

    def __init__(self) -> None:
        self.handles = []  # type: List[Any]
        try:
            import pynvml  # optional: nvidia-ml-py

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:
            self.handles = []

    @property
    def available(self) -> bool:
        return bool(self.handles)

    def sample(self) -> Dict[str, float]:
        values = {}  # type: Dict[str, float]
        for index, handle in enumerate(self.handles):
            values.update(self._gpu(index, handle))
        return values

    def _gpu(self, index: int, handle: Any) -> Dict[str, float]:
        nvml, prefix, values = self.nvml, "gpu.%d." % index, {}  # type: Any, str, Dict[str, float]
        readings = (
            ("utilization", lambda: nvml.nvmlDeviceGetUtilizationRates(handle)),
            ("memory", lambda: nvml.nvmlDeviceGetMemoryInfo(handle)),
            ("temp", lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
            ("power", lambda: nvml.nvmlDeviceGetPowerUsage(handle)),
            ("limit", lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle)),
        )
        read = {}
        for name, call in readings:
            try:
                read[name] = call()
            except Exception:
                pass
        if "utilization" in read:
            values[prefix + "gpu"] = float(read["utilization"].gpu)
            values[prefix + "memory"] = float(read["utilization"].memory)
        if "memory" in read and read["memory"].total:
            values[prefix + "memoryAllocated"] = 100.0 * read["memory"].used / read["memory"].total
            values[prefix + "memoryAllocatedBytes"] = float(read["memory"].used)
        if "temp" in read:
            values[prefix + "temp"] = float(read["temp"])
        if "power" in read:
            values[prefix + "powerWatts"] = read["power"] / 1000.0
            if read.get("limit"):
                values[prefix + "enforcedPowerLimitWatts"] = read["limit"] / 1000.0
                values[prefix + "powerPercent"] = 100.0 * read["power"] / read["limit"]
        return values


class Sampler(threading.Thread):
    """Every `interval` seconds, one sample handed to `submit(message)` as a `system` record, until
    `submit` returns False (the run no longer takes them) or `stop()`."""

    def __init__(self, run_id: str, interval: float, submit: Callable[[Dict[str, Any]], bool]):
        super().__init__(name="relay-system-metrics", daemon=True)
        self.run_id = run_id
        self.interval = float(interval)
        self.submit = submit
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        proc = ProcReader()
        gpus = NvmlReader()
        while not self._halt.wait(self.interval):
            try:
                values = proc.sample()
                values.update(gpus.sample())
            except Exception:  # never the trainer's problem: this sample is skipped
                continue
            if values and not self.submit({"t": "system", "run": self.run_id, "values": values,
                                           "time": time.time()}):
                return


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return None


def _sysconf(name: str) -> Optional[int]:
    try:
        return os.sysconf(name)
    except (ValueError, OSError, AttributeError):
        return None
