"""Start a ``dask scheduler`` and one ``dask worker`` on 127.0.0.1 and wait until both answer.

Used by ``.ci/run`` (before the test command) and by ``test_batch.py`` when no
scheduler was started for it. Prints the scheduler's address on stdout once the
worker has joined; exits 1 with both logs on stderr if that takes longer than
``--timeout`` seconds. The processes keep running after this script exits; their
pids go to ``--pids`` so that the caller can stop them.

    python tests/dask_services.py --dir /tmp/dask --timeout 180
"""
import argparse
import os
import subprocess
import sys
import time


def start(workdir, timeout=180.0):
    """Start both services under ``workdir``; return (address, [scheduler, worker] Popen)."""
    os.makedirs(workdir, exist_ok=True)
    sched_file = os.path.join(workdir, "scheduler.json")
    if os.path.exists(sched_file):
        os.remove(sched_file)
    logs = [open(os.path.join(workdir, n), "w") for n in ("scheduler.log", "worker.log")]
    common = dict(stdin=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    sched = subprocess.Popen([sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", "0",
                              "--no-dashboard", "--scheduler-file", sched_file], stdout=logs[0], **common)
    worker = subprocess.Popen([sys.executable, "-m", "dask", "worker", "--scheduler-file", sched_file,
                               "--nworkers", "1", "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard"],
                              stdout=logs[1], **common)
    procs = [sched, worker]
    try:
        address = wait_ready(sched_file, procs, timeout)
    except Exception:
        stop(procs)
        for log in logs:
            log.flush()
            sys.stderr.write(f"--- {log.name}\n{open(log.name).read()}\n")
        raise
    return address, procs


def wait_ready(sched_file, procs, timeout):
    """Poll until the scheduler file exists and one worker has registered; return the address."""
    import json

    from distributed import Client

    deadline = time.monotonic() + timeout
    while not os.path.exists(sched_file):
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a dask service exited during start-up")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no scheduler file after {timeout:.0f} s")
        time.sleep(0.2)
    time.sleep(0.2)  # the file is written whole, but give the writer its close
    address = json.load(open(sched_file))["address"]
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the worker did not join {address} within {timeout:.0f} s")
        try:
            with Client(address, timeout=min(left, 30)) as c:
                c.wait_for_workers(1, timeout=max(1.0, deadline - time.monotonic()))
            return address
        except (OSError, TimeoutError):
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a dask service exited during start-up")


def stop(procs):
    """Terminate the services and whatever they started (the worker's nanny child)."""
    import signal

    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
    for p in reversed(procs):
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True, help="folder for the scheduler file and the logs")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for both services")
    ap.add_argument("--pids", help="file to write the two process ids to")
    args = ap.parse_args()
    address, procs = start(args.dir, args.timeout)
    if args.pids:
        with open(args.pids, "w") as f:
            f.write(" ".join(str(p.pid) for p in procs) + "\n")
    print(address)


if __name__ == "__main__":
    main()
