"""A trainer-like process for the tests: logs a deterministic workload through relay.client.

Prints one JSON line per event on stdout: {"event": "logged", ...} once every step is handed to
the client, then {"event": "finished", ...} with finish()'s report and the client statistics.
Run as: python tests/trainer.py '<json args>'.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from workload import frame, row  # noqa: E402

from relay.client import RelayClient  # noqa: E402


def main(args: dict) -> int:
    # Provenance and system metrics are off unless asked for: the records each test counts are its own.
    client = RelayClient(args["endpoint"], spill_dir=args.get("spill_dir"), max_pending=args.get("max_pending", 10000),
                         heartbeat_every=args.get("heartbeat_every", 10.0), keys=args.get("keys"),
                         provenance=args.get("provenance", False), system_metrics=args.get("system_metrics", 0))
    run = client.start_run(project=args.get("project", "relay-tests"), name=args.get("name"), run_id=args["run_id"],
                           group=args.get("group"), tags=args.get("tags"), notes=args.get("notes"),
                           config=args.get("config"))
    latencies = []
    start = args.get("start_step", 0)  # a trainer resumed from an older checkpoint starts lower
    for step in range(start, start + args["steps"]):
        started = time.perf_counter()
        run.log(row(args["seed"], step, args["metrics"]), frame=frame(step), epoch=step + 1)
        for checkpoint in args.get("checkpoints", ()):  # [{"path", "after_step", "metadata", "aliases"}]
            if checkpoint["after_step"] == step:
                run.log_checkpoint(checkpoint["path"], metadata=checkpoint.get("metadata"),
                                   aliases=checkpoint.get("aliases"))
        latencies.append(time.perf_counter() - started)
        if args.get("interval"):
            time.sleep(args["interval"])  # the simulated training step
    print(json.dumps({"event": "logged", "max_latency": max(latencies, default=0.0)}), flush=True)
    if args.get("linger"):
        time.sleep(args["linger"])  # the run stays open (its system metrics sampled meanwhile)
    if args.get("flush_before_wait"):
        client.flush(60.0)  # the client sends during calls: hand everything over before going quiet
    if args.get("wait_stdin"):
        sys.stdin.readline()
    report = run.finish(exit_code=args.get("exit_code", 0), timeout=args.get("finish_timeout", 60.0))
    stats = client.statistics()
    client.close()
    print(json.dumps({"event": "finished", "report": report, "stats": stats,
                      "max_latency": max(latencies, default=0.0)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
