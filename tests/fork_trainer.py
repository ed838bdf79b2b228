"""A trainer that forks mid-run, for the tests: both processes go on logging through the client.

The parent starts a run and logs `before` steps, then forks. The child first tries the parent's
run (every method, and `start_run` with its id) and records what each raised, then starts a run
of its own (`<run_id>-child`) and logs `steps` rows with seed+1; the parent logs `steps` more rows
of its run meanwhile. Each finishes, closes its client and reports; the parent prints one JSON line
{"parent": {...}, "child": {...}} once the child has exited.
Run as: python tests/fork_trainer.py '<json args>'.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from workload import frame, row  # noqa: E402

from relay.client import RelayClient  # noqa: E402


def log_steps(run, seed: int, first: int, count: int, metrics: int) -> None:
    for step in range(first, first + count):
        run.log(row(seed, step, metrics), frame=frame(step), epoch=step + 1)


def refusals(client: RelayClient, run, project: str) -> list:
    """What each use of the parent's run raises here: [exception type, message] or None."""
    attempts = [
        lambda: run.log({"x": 1.0}, frame=1),
        lambda: run.log_checkpoint("/nonexistent/nn/ckpt.pth"),
        lambda: run.summary({"x": 1.0}),
        lambda: run.finish(exit_code=0, timeout=0.1),
        lambda: client.start_run(project=project, run_id=run.id),
    ]
    found = []
    for attempt in attempts:
        try:
            attempt()
            found.append(None)
        except Exception as exc:
            found.append([type(exc).__name__, str(exc)])
    return found


def finish(client: RelayClient, run, timeout: float) -> dict:
    report = run.finish(exit_code=0, timeout=timeout)
    stats = client.statistics()
    client.close()
    return {"pid": os.getpid(), "report": report, "stats": stats}


def main(args: dict) -> int:
    client = RelayClient(args["endpoint"], spill_dir=args["spill_dir"],
                         heartbeat_every=args.get("heartbeat_every", 0.5), provenance=False, system_metrics=0)
    project, metrics, seed = args.get("project", "relay-tests"), args["metrics"], args["seed"]
    run = client.start_run(project=project, run_id=args["run_id"])
    log_steps(run, seed, 0, args["before"], metrics)
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:
        code = 1
        try:
            os.close(reader)
            report = {"refusals": refusals(client, run, project)}
            own = client.start_run(project=project, run_id=args["run_id"] + "-child")
            log_steps(own, seed + 1, 0, args["steps"], metrics)
            report.update(finish(client, own, args.get("finish_timeout", 60.0)))
            with os.fdopen(writer, "w") as handle:
                handle.write(json.dumps(report))
            code = 0
        finally:
            os._exit(code)  # the parent's atexit handlers and buffers are not the child's to run
    os.close(writer)
    log_steps(run, seed, args["before"], args["steps"], metrics)
    parent = finish(client, run, args.get("finish_timeout", 60.0))
    with os.fdopen(reader) as handle:
        child_report = json.loads(handle.read() or "null")
    _, status = os.waitpid(child, 0)
    parent["child_exit"] = os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else status
    print(json.dumps({"parent": parent, "child": child_report}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
