"""Run every benchmark in turn (`make bench`); exit non-zero if any failed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ("append.py", "batch_cost.py", "relay_latency.py", "ack_latency.py", "idle_memory.py", "fanout.py",
           "fanout.py --redis-cluster", "latency_fanout.py", "latency_fanout.py --redis-cluster",
           "tasks.py", "start_latency.py", "drain.py", "read_bound.py", "cpu_per_task.py")
TIMEOUT_S = 120  # each script stops itself within 90 s; this only catches a hang
LONGER_S = {"drain.py": 510}  # drain.py stops itself within 480 s
STOP_GRACE_S = 20


def main() -> int:
    failed = []
    for script in SCRIPTS:
        print(f"== {script}", flush=True)
        name, *args = script.split()
        proc = subprocess.Popen([sys.executable, str(HERE / name), *args])
        try:
            code = proc.wait(LONGER_S.get(script, TIMEOUT_S))
        except subprocess.TimeoutExpired:
            # SIGTERM first: the script then stops its servers and drops its database.
            proc.terminate()
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            print(f"{script} did not finish within {LONGER_S.get(script, TIMEOUT_S)} s", file=sys.stderr)
            code = -1
        if code != 0:
            failed.append(script)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
