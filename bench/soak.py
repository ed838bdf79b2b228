"""Soak: N trainer processes x M minutes of chaos through one relay, counted row by row.

The relay is SIGKILLed and restarted at random moments (every 0.5-4 s something happens: a kill
and restart, or the fake W&B backend flipping between ok, hang and 503; tests/chaos.py). Trainers come in waves of N, each logging 20 metrics every
10 ms for about a minute; after each wave every run's W&B history is checked against what its
trainer logged. Prints per wave: sent / delivered / lost / duplicated / max client latency /
relay RSS (server process, and with its uploader processes and their wandb-core), then a JSON summary.

    python bench/soak.py --clients 8 --minutes 10
    python bench/soak.py --quick          # 2 clients, 1 minute
    python bench/soak.py --quick --dry-run    # 1 client, one 3 s wave: checks it still runs
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from chaos import Outcome, chaos_round, check_history  # noqa: E402
from common import descendants, rss_kib  # noqa: E402
from fakewandb import FakeWandb  # noqa: E402
from harness import FAST_RETRIES, ROOT, RelayProcess, TrainerProcess, wandb_env  # noqa: E402


class RssSampler(threading.Thread):
    def __init__(self, relay: RelayProcess):
        super().__init__(daemon=True)
        self.relay = relay
        self.samples: list[tuple[float, int, int]] = []   # (seconds, server KiB, server + uploaders KiB)
        self.stop = threading.Event()
        self.started = time.monotonic()

    def run(self) -> None:
        while not self.stop.wait(5.0):
            pid = self.relay.proc.pid
            server = rss_kib(pid)
            total = server + sum(rss_kib(child) for child in descendants(pid))
            self.samples.append((time.monotonic() - self.started, server, total))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--wave-seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=random.SystemRandom().randrange(1 << 30))
    parser.add_argument("--quick", action="store_true", help="2 clients, 1 minute, 30 s waves")
    parser.add_argument("--dry-run", action="store_true", help="1 client, one 3 s wave: does it still run")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.minutes, args.wave_seconds = 2, 1.0, 30.0
    if args.dry_run:
        args.clients, args.minutes, args.wave_seconds = 1, 0.05, 3.0
    print("soak: %d clients, %.1f minutes, seed %d" % (args.clients, args.minutes, args.seed), flush=True)
    rng = random.Random(args.seed)
    workdir = tempfile.mkdtemp(prefix="relay-soak-")
    fake = FakeWandb()
    fake.start()
    env = wandb_env(fake, os.path.join(workdir, "home"))
    env.update(FAST_RETRIES)
    env.update({"RELAY_CONFIRM_EVERY": "5", "RELAY_BACKOFF_MAX": "2"})
    relay = RelayProcess("ipc://%s/relay.ipc" % workdir, os.path.join(workdir, "spool"), env,
                         ["--mode", "online", "--log-level", "INFO"], os.path.join(workdir, "relay.log"))
    relay.start()
    sampler = RssSampler(relay)
    sampler.start()
    total = Outcome()
    deadline = time.monotonic() + args.minutes * 60
    wave = 0
    steps = int(args.wave_seconds / 0.01)
    trainer_env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "RELAY_"))}
    trainer_env["PYTHONPATH"] = ROOT
    try:
        while time.monotonic() < deadline:
            runs = []
            for client in range(args.clients):
                run_id, seed = "soak%d-%d" % (wave, client), rng.randrange(1 << 30)
                runs.append((run_id, seed, TrainerProcess(
                    {"endpoint": relay.endpoint, "run_id": run_id, "steps": steps, "metrics": 20, "seed": seed,
                     "interval": 0.01, "finish_timeout": 120, "spill_dir": os.path.join(workdir, "spill")},
                    trainer_env)))
            outcome = chaos_round(rng, relay, fake, [t for _, _, t in runs], duration=args.wave_seconds,
                                  pause=(0.5, 4.0))
            for run_id, seed, trainer in runs:
                done = trainer.event("finished", timeout=300)
                outcome.max_latency = max(outcome.max_latency, done["max_latency"])
                fake.wait_for(lambda: fake.complete(run_id), 300)
                check_history(fake.run(run_id).history, seed, steps, 20, outcome)
            server_kib, total_kib = sampler.samples[-1][1:] if sampler.samples else (0, 0)
            print("wave %d: sent %d delivered %d lost %d duplicated %d out_of_order %d max client latency %.2f ms "
                  "relay kills %d faults %d relay RSS %.0f MiB (with uploaders %.0f MiB)" % (
                      wave, outcome.sent, outcome.delivered, outcome.lost, outcome.duplicated, outcome.out_of_order,
                      outcome.max_latency * 1e3, outcome.relay_kills, len(outcome.faults),
                      server_kib / 1024, total_kib / 1024), flush=True)
            for name in ("sent", "delivered", "lost", "duplicated", "out_of_order", "relay_kills"):
                setattr(total, name, getattr(total, name) + getattr(outcome, name))
            total.max_latency = max(total.max_latency, outcome.max_latency)
            total.faults += outcome.faults
            wave += 1
    finally:
        sampler.stop.set()
        relay.stop()
        fake.stop()
    servers = [s for _, s, _ in sampler.samples if s] or [0]   # 0: sampled while the relay was killed
    totals = [t for _, _, t in sampler.samples if t] or [0]
    print("relay RSS over time (s: server MiB / with uploaders MiB): " + ", ".join(
        "%.0f: %.0f/%.0f" % (t, s / 1024, a / 1024) for t, s, a in sampler.samples[::6]))
    summary = {"clients": args.clients, "minutes": args.minutes, "seed": args.seed, "waves": wave,
               "sent": total.sent, "delivered": total.delivered, "lost": total.lost,
               "duplicated": total.duplicated, "out_of_order": total.out_of_order,
               "max_client_latency_ms": round(total.max_latency * 1e3, 2), "relay_kills": total.relay_kills,
               "faults": len(total.faults), "server_rss_mib_min_max": [round(min(servers) / 1024), round(max(servers) / 1024)],
               "with_uploaders_rss_mib_max": round(max(totals) / 1024)}
    print(json.dumps(summary))
    shutil.rmtree(workdir, ignore_errors=True)
    return 0 if total.lost == total.duplicated == total.out_of_order == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
