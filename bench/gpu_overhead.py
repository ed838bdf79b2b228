"""What logging 40 scalar CUDA tensors every step costs a ~2 ms training step.

A real training step on the GPU (an MLP, forward + backward + Adam, its batch sized so that a
step takes about `--step-ms`) produces 40 0-d metric tensors (loss, per-layer norms and
activation statistics). Three ways to handle them, interleaved in blocks of steps in one process
and timed with a device sync at the end of each block:

    nothing   the metrics are computed and not read (the baseline)
    item      `run.log({k: v.item() ...})` through the relay client: 40 reads, each waits for the GPU
    relay     `run.log(metrics)` with the tensors themselves: the client copies the row to the host
              in one non-blocking transfer and sends it once the copy has landed (relay.tensors)

The relay client talks to a live `relay serve` subprocess (offline mode, throwaway spool).

    python bench/gpu_overhead.py               # needs CUDA (exits 2 without), 3,000 steps per way
    python bench/gpu_overhead.py --quick       # 600 steps per way
    python bench/gpu_overhead.py --quick --dry-run   # CPU tensors, a few steps: the same code path

The last line is a JSON summary. Target: <= 2 % overhead with the relay client
(per-metric `.item()` costs about 23 % on an H200).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import Relay  # noqa: E402

WAYS = ("nothing", "item", "relay")


class Trainer:
    """An MLP trained on random data; `step()` returns the step's 40 metrics as 0-d tensors."""

    def __init__(self, torch, device: str, width: int, batch: int):
        self.torch = torch
        self.device = device
        torch.manual_seed(0)
        self.layers = [torch.nn.Linear(width, width).to(device) for _ in range(4)]
        self.params = [p for layer in self.layers for p in layer.parameters()]
        self.optimizer = torch.optim.Adam(self.params, lr=1e-4)
        self.x = torch.randn(batch, width, device=device)
        self.target = torch.randn(batch, width, device=device)

    def step(self) -> dict:
        torch = self.torch
        metrics = {}
        h = self.x
        for i, layer in enumerate(self.layers):
            h = torch.tanh(layer(h))
            metrics["act/%d_mean" % i] = h.detach().mean()
            metrics["act/%d_std" % i] = h.detach().std()
        loss = torch.nn.functional.mse_loss(h, self.target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        metrics["losses/loss"] = loss.detach()
        for i, layer in enumerate(self.layers):
            for name, p in (("w", layer.weight), ("b", layer.bias)):
                metrics["norm/%d_%s" % (i, name)] = p.detach().norm()
                metrics["grad/%d_%s" % (i, name)] = p.grad.detach().norm()
        i = 0
        while len(metrics) < 40:
            metrics["out/%02d" % i] = h.detach()[:, i].mean()
            i += 1
        return metrics


def sync(torch, device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def calibrate(torch, device: str, width: int, step_ms: float, dry_run: bool) -> int:
    """A batch size whose step (metrics included, none read) takes about `step_ms`."""
    if dry_run:
        return 8
    batch = 1024
    for _ in range(4):
        trainer = Trainer(torch, device, width, batch)
        for _ in range(10):
            trainer.step()
        sync(torch, device)
        started = time.perf_counter()
        for _ in range(50):
            trainer.step()
        sync(torch, device)
        took = (time.perf_counter() - started) / 50 * 1e3
        batch = max(64, int(batch * step_ms / took) // 64 * 64)
        if abs(took - step_ms) < 0.1 * step_ms:
            break
    return batch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="steps per way")
    parser.add_argument("--block", type=int, default=100, help="steps per turn; the ways alternate")
    parser.add_argument("--step-ms", type=float, default=2.0)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="600 steps per way")
    parser.add_argument("--dry-run", action="store_true", help="CPU tensors, a few steps: does it still run")
    args = parser.parse_args()
    import torch

    if args.dry_run:
        device, args.steps, args.block, args.width = "cpu", 6, 2, 16
    elif not torch.cuda.is_available():
        print("gpu_overhead.py needs CUDA (use --dry-run to check the script on a CPU)", file=sys.stderr)
        print(json.dumps({"error": "needs CUDA"}))
        return 2
    else:
        device = "cuda"
    if args.quick and not args.dry_run:
        args.steps = 600
    from relay.client import RelayClient

    workdir = tempfile.mkdtemp(prefix="relay-gpu-")
    relay = Relay(os.path.join(workdir, "spool"), mode="offline")
    try:
        relay.wait_ready()
        # rows_acked below counts the open record and the rows: no provenance or system records
        client = RelayClient(relay.endpoint, spill_dir=os.path.join(workdir, "spill"), provenance=False, system_metrics=0)
        run = client.start_run(project="bench", run_id="gpu-overhead")
        batch = calibrate(torch, device, args.width, args.step_ms, args.dry_run)
        trainer = Trainer(torch, device, args.width, batch)
        step_no = 0

        def one(way: str) -> None:
            nonlocal step_no
            metrics = trainer.step()
            if way == "item":
                run.log({name: value.item() for name, value in metrics.items()}, frame=step_no)
            elif way == "relay":
                run.log(metrics, frame=step_no)
            step_no += 1

        for way in WAYS:  # warm-up: kernels, allocator, pinned host memory
            for _ in range(min(20, args.block)):
                one(way)
        sync(torch, device)
        seconds = {way: 0.0 for way in WAYS}
        done = {way: 0 for way in WAYS}
        while min(done.values()) < args.steps:
            for way in WAYS:
                sync(torch, device)
                started = time.perf_counter()
                for _ in range(args.block):
                    one(way)
                sync(torch, device)
                seconds[way] += time.perf_counter() - started
                done[way] += args.block
        report = run.finish(timeout=120)
        stats = client.statistics()
        client.close()
    finally:
        relay.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    step_ms = {way: seconds[way] / done[way] * 1e3 for way in WAYS}
    base = step_ms["nothing"]
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print("%s, batch %d x width %d, %d steps per way, 40 metrics per step" % (name, batch, args.width, done["nothing"]))
    for way in WAYS:
        print("%-8s %8.3f ms/step  %+6.1f %%" % (way, step_ms[way], 100 * (step_ms[way] / base - 1)))
    summary = {"device": name, "batch": batch, "width": args.width, "steps": done["nothing"],
               "step_ms": {way: round(ms, 4) for way, ms in step_ms.items()},
               "overhead_item": round(step_ms["item"] / base - 1, 4),
               "overhead_relay": round(step_ms["relay"] / base - 1, 4),
               "relay_delivered": report["delivered"], "rows_acked": stats["acked"] - 1}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
