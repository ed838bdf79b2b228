"""Metric values on their way from an accelerator to the host: one batched copy per row.

`.item()` on a CUDA tensor waits for the GPU to finish everything queued before it: 40 metrics read
that way are 40 stalls of the training loop. Here the row's 1-element tensors are stacked per
device (`torch.stack([v.detach().reshape(()).double() ...])`, float32 off CPU/CUDA) and copied to
the host in ONE transfer; from CUDA the copy goes non-blocking into pinned memory and a CUDA event
is recorded, so `ready()` can be asked without waiting and `values()` waits at most for this row's
copy. Float64 is used so that int and float64 tensors keep their value.

`Waiting` keeps rows whose copy is under way in the order they came and hands them on, in that
order, once their copies have landed: the one deferral of both users, relay.rl_games (rows of
the SummaryWriter) and relay.outbox (the client's `run.log` of CUDA tensors).
Imports nothing outside the standard library (torch is looked up in sys.modules: a tensor in a row
means torch is imported already); must stay importable on Python 3.8 (IsaacGym environments).
"""
from __future__ import annotations

import sys
from collections import deque
from typing import Any, Dict, Iterator, List, Optional, Tuple  # noqa: F401 (List, Tuple: in type comments)


class Transfer(object):
    """One row's values on their way to the host. `ready()` never waits; `values()` waits at most
    for this row's copies (which an epoch of later work has normally finished long before)."""

    __slots__ = ("order", "plain", "parts", "events", "skipped")

    def __init__(self) -> None:
        self.order = []    # type: List[str]
        self.plain = {}    # type: Dict[str, Any]
        self.parts = []    # type: List[Tuple[List[str], Any]]  (names, host tensor)
        self.events = []   # type: List[Any]  (CUDA events recorded after the copies)
        self.skipped = []  # type: List[str]  (names whose value is not a single number)

    def ready(self) -> bool:
        return all(event.query() for event in self.events)

    def values(self) -> Dict[str, Any]:
        for event in self.events:
            event.synchronize()
        self.events = []
        got = dict(self.plain)
        for names, host in self.parts:
            got.update(zip(names, host.tolist()))
        return {name: got[name] for name in self.order if name in got}


class Waiting(object):
    """Rows waiting, in the order they came, for their values to land on the host. A row is any
    object of the caller's, with the Transfer of its values (None: nothing to wait for)."""

    __slots__ = ("_rows",)

    def __init__(self) -> None:
        self._rows = deque()  # type: deque  ((row, Transfer or None), oldest first)

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, row: Any, transfer: Optional[Transfer]) -> None:
        self._rows.append((row, transfer))

    def clear(self) -> None:
        self._rows.clear()

    def landed(self, wait: bool) -> Iterator[Tuple[Any, Optional[Dict[str, Any]]]]:
        """(row, its values or None) for the oldest rows whose copy has landed, oldest first, up to
        the first one still under way (never waiting for it); `wait`: every row, waiting for each
        copy. A row leaves the queue as it is handed on."""
        rows = self._rows
        while rows:
            row, transfer = rows[0]
            if transfer is not None and not wait and not transfer.ready():
                return
            rows.popleft()
            yield row, (transfer.values() if transfer is not None else None)


def start_transfer(row: Dict[str, Any]) -> Transfer:
    """Start moving a row of metric values to the host: numbers pass through, the 1-element
    tensors are stacked per device (see _stack) and copied in one go (non-blocking into pinned memory from
    CUDA). No `.item()` is called on any tensor."""
    transfer = Transfer()
    torch = sys.modules.get("torch")  # a tensor in the row means torch is imported already
    tensor_type = torch.Tensor if torch is not None else None
    groups = {}  # type: Dict[Any, Tuple[List[str], List[Any]]]
    for name, value in row.items():
        transfer.order.append(name)
        kind = type(value)
        if kind is float or kind is int or kind is bool or kind is str:
            transfer.plain[name] = value
        elif tensor_type is not None and isinstance(value, tensor_type):
            if value.numel() != 1:
                transfer.skipped.append(name)
                continue
            group = groups.get(value.device)
            if group is None:
                group = groups[value.device] = ([], [])
            group[0].append(name)
            group[1].append(value)
        else:
            plain = _plain_number(value)
            if plain is None:
                transfer.skipped.append(name)
            else:
                transfer.plain[name] = plain
    for device, (names, tensors) in groups.items():
        wide = torch.float64 if device.type in ("cpu", "cuda") else torch.float32
        names, stacked = _stack(torch, names, tensors, wide)
        if device.type == "cpu":
            host = stacked
        elif device.type == "cuda":
            host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
            host.copy_(stacked, non_blocking=True)
            with torch.cuda.device(device):
                event = torch.cuda.Event()
                event.record()
            transfer.events.append(event)
        else:  # other accelerators: one blocking copy per row
            host = stacked.to("cpu")
        transfer.parts.append((names, host))
    return transfer


def _stack(torch: Any, names: List[str], tensors: List[Any], wide: Any) -> Tuple[List[str], Any]:
    """One 1-d tensor of dtype `wide` holding the values, and their names in its order. Tensors of
    one dtype are stacked first and widened together: two kernels for a row of float32 metrics,
    not one widening kernel per value (on a GPU each launch costs about as much as the copy)."""
    by_dtype = {}  # type: Dict[Any, Tuple[List[str], List[Any]]]
    for name, tensor in zip(names, tensors):
        group = by_dtype.get(tensor.dtype)
        if group is None:
            group = by_dtype[tensor.dtype] = ([], [])
        group[0].append(name)
        group[1].append(tensor.detach().reshape(()))
    ordered = []  # type: List[str]
    parts = []
    for group_names, group in by_dtype.values():
        ordered.extend(group_names)
        parts.append(torch.stack(group).to(wide))
    return ordered, parts[0] if len(parts) == 1 else torch.cat(parts)


def batch_to_python(row: Dict[str, Any]) -> Dict[str, Any]:
    """`start_transfer(row).values()`: the row with every value a Python number (or str)."""
    return start_transfer(row).values()


def _plain_number(value: Any) -> Any:
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    item = getattr(value, "item", None)  # numpy scalars and 1-element arrays (host memory)
    if item is not None and getattr(value, "size", 1) == 1:
        try:
            got = item()
        except Exception:
            return None
        return got if isinstance(got, (bool, int, float, str)) else None
    return None
