"""Histograms binned on the trainer: counts and edges, as W&B's `np_histogram` takes them.

`bin_values(values, bins)` takes a list (or any iterable of numbers), a numpy array or a torch
tensor, and returns (counts, edges): `bins` equal-width bins from the smallest to the largest
finite value, the last bin closed on the right, as `numpy.histogram` bins them (the same counts
and edges). Values that are not finite (NaN, infinities) are left out. When every value is the
same v, the range is (v - 0.5, v + 0.5); with no finite value at all, (0, 1).

- a numpy array: `numpy.histogram`;
- a torch tensor on the CPU: its values as a numpy array, `numpy.histogram`;
- a tensor on an accelerator: binned there (min, max and a bincount of the bin indices) and the
  counts with the range copied to the host in one transfer: one wait for the device per
  histogram (per `bin_many` call for several), never one per value; a value within rounding of
  an edge may fall in the bin beside the one numpy would choose;
- anything else: `numpy.histogram` when numpy can be imported, else the same binning in Python.

Imports nothing outside the standard library at module level (numpy and torch only when a value
needs them); must stay importable on Python 3.8 (IsaacGym environments).
"""
from __future__ import annotations

import math
import sys
from typing import Any, Dict, List, Tuple

MAX_BINS = 512  # W&B's own limit


def check_bins(bins: Any) -> int:
    if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= MAX_BINS:
        raise ValueError("bins must be an int from 1 to %d (W&B's limit), got %r" % (MAX_BINS, bins))
    return bins


def bin_values(values: Any, bins: int = 64) -> Tuple[List[int], List[float]]:
    """(counts, edges) of `values` in `bins` equal bins; see the module docstring."""
    bins = check_bins(bins)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(values, torch.Tensor):
        values = values.detach()
        if values.device.type != "cpu":
            return _bin_on_device(torch, values, bins)
        values = values.reshape(-1).double().numpy()
    numpy = _numpy()
    if numpy is not None:
        array = numpy.asarray(values, dtype=numpy.float64).reshape(-1)
        array = array[numpy.isfinite(array)]
        counts, edges = numpy.histogram(array, bins=bins)
        return [int(count) for count in counts], [float(edge) for edge in edges]
    return _bin_in_python([float(value) for value in values], bins)


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def _range(lo: float, hi: float) -> Tuple[float, float]:
    if lo > hi:          # no finite value
        return 0.0, 1.0
    if lo == hi:
        return lo - 0.5, hi + 0.5
    return lo, hi


def _edges(lo: float, hi: float, bins: int) -> List[float]:
    """numpy.linspace(lo, hi, bins + 1)'s values."""
    step = (hi - lo) / bins
    return [lo + index * step for index in range(bins)] + [hi]


def _bin_in_python(values: List[float], bins: int) -> Tuple[List[int], List[float]]:
    finite = [value for value in values if math.isfinite(value)]
    lo, hi = _range(min(finite, default=math.inf), max(finite, default=-math.inf))
    edges = _edges(lo, hi, bins)
    counts = [0] * bins
    norm = bins / (hi - lo)
    for value in finite:
        index = min(int((value - lo) * norm), bins - 1)
        if value < edges[index]:            # numpy's correction for rounding at the edges
            index -= 1
        elif index != bins - 1 and value >= edges[index + 1]:
            index += 1
        counts[index] += 1
    return counts, edges


def bin_many(named: Dict[str, Any], bins: int = 64) -> Dict[str, Tuple[List[int], List[float]]]:
    """`bin_values` of several tensors (or lists) at once: the ones on an accelerator are binned there
    and copied to the host together, in ONE transfer (the rl_games observer's actions and rewards)."""
    bins = check_bins(bins)
    torch = sys.modules.get("torch")
    on_device = [name for name, values in named.items() if torch is not None and isinstance(values, torch.Tensor)
                 and values.device.type != "cpu"]
    binned = {name: bin_values(values, bins) for name, values in named.items() if name not in on_device}
    if on_device:
        parts = torch.cat([_device_parts(torch, named[name].detach(), bins).to(named[on_device[0]].device)
                           for name in on_device]).cpu().tolist()
        for index, name in enumerate(on_device):
            binned[name] = _from_parts(parts[index * (bins + 3):(index + 1) * (bins + 3)], bins)
    return {name: binned[name] for name in named}


def _bin_on_device(torch: Any, values: Any, bins: int) -> Tuple[List[int], List[float]]:
    """Bin on the tensor's own device; one copy of (counts, lo, hi, how many) to the host."""
    return _from_parts(_device_parts(torch, values, bins).cpu().tolist(), bins)


def _device_parts(torch: Any, values: Any, bins: int) -> Any:
    """[counts..., lo, hi, finite values] as one float64 tensor on the values' device. Nothing here
    waits for the device (no boolean indexing, no `.item()`): non-finite values are weighed 0."""
    flat = values.reshape(-1).double()
    zero = torch.zeros((), dtype=torch.float64, device=flat.device)
    if not flat.numel():
        return torch.cat([torch.zeros(bins, dtype=torch.float64, device=flat.device), zero.repeat(3)])
    finite = torch.isfinite(flat)
    count = finite.sum().double()
    lo = torch.where(finite, flat, zero + math.inf).min()
    hi = torch.where(finite, flat, zero - math.inf).max()
    lo, hi = torch.where(count > 0, lo, zero), torch.where(count > 0, hi, zero)
    width = torch.where(hi > lo, hi - lo, zero + 1.0)
    index = ((torch.where(finite, flat, lo) - lo) * (bins / width)).floor().clamp_(0, bins - 1).long()
    counts = torch.bincount(index, weights=finite.double(), minlength=bins)
    return torch.cat([counts, torch.stack([lo, hi, count])])


def _from_parts(parts: List[float], bins: int) -> Tuple[List[int], List[float]]:
    counts, (lo, hi, finite) = [int(count) for count in parts[:bins]], parts[bins:]
    if not finite:
        return [0] * bins, _edges(0.0, 1.0, bins)
    if lo == hi:  # every value in the middle bin, as numpy puts them
        counts = [0] * bins
        counts[bins // 2] = int(finite)
    return counts, _edges(*_range(lo, hi), bins)
