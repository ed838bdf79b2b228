"""A trainer whose console goes to its W&B run, for tests/test_console.py.

Run as: python tests/console_trainer.py '<json args>'. Logs a row; for each of `phases` [lines,
rows], once a line comes on stdin, prints that many lines and logs that many rows; prints `lines`
pairs of known lines, one to stdout and one to stderr, then `flood` lines as fast as it can (timing each thousand), then
finishes the run, or raises (`crash`) without finishing it. What it measured (and finish()'s
report, the client's errors) goes to the file `report`: its stdout is the console under test.
"""
import json
import sys
import time

from relay.client import RelayClient
from relay.console import ConsoleLimits


def main(args: dict) -> None:
    client = RelayClient(args["endpoint"], spill_dir=args["spill_dir"], provenance=False, system_metrics=0)
    console = ConsoleLimits(**args["limits"]) if args.get("limits") else args.get("console", True)
    run = client.start_run(project="relay-tests", run_id=args["run_id"], console=console)
    run.log({"loss": 0.5}, frame=1)
    for phase, (lines, rows) in enumerate(args.get("phases", ())):  # each after a line on stdin
        sys.stdin.readline()
        for index in range(lines):
            print("phase %d line %d" % (phase, index))
        client.flush(30)  # the lines' record first, then the rows
        for index in range(rows):
            run.log({"loss": float(index)}, frame=1000 * (phase + 1) + index)
        client.flush(30)
    for index in range(args.get("lines", 0)):
        print("line %d of stdout" % index)
        print("line %d of stderr" % index, file=sys.stderr)
    slowest = 0.0
    started = time.perf_counter()
    for block in range(args.get("flood", 0) // 1000):
        block_started = time.perf_counter()
        for index in range(1000):
            print("flood %d" % (block * 1000 + index))
        slowest = max(slowest, (time.perf_counter() - block_started) / 1000)
    report = {"per_print": (time.perf_counter() - started) / max(1, args.get("flood", 0)),
              "slowest_block_per_print": slowest}
    if args.get("crash"):
        write(args["report"], report)
        raise RuntimeError("the trainer crashed on purpose (%s)" % args["run_id"])
    report["finish"] = run.finish(exit_code=0, timeout=60)
    report["errors"] = client.errors
    client.close()
    write(args["report"], report)


def write(path: str, report: dict) -> None:
    with open(path, "w") as handle:
        json.dump(report, handle)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
