"""Run every benchmark in turn (`make bench`); exit non-zero if any failed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ("append.py", "relay_latency.py", "ack_latency.py")
TIMEOUT_S = 90  # each script stops itself within 60 s; this only catches a hang


def main() -> int:
    failed = []
    for script in SCRIPTS:
        print(f"== {script}", flush=True)
        try:
            code = subprocess.run([sys.executable, str(HERE / script)], timeout=TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            code = -1
        if code != 0:
            failed.append(script)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
