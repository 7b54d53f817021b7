"""Run ``make demo`` in a checkout, time it, and record its report in ``benchmarks/results/``.

    python benchmarks/record_demo.py [--checkout DIR] [--name NAME] [--note "clean clone, idle machine"]

``DIR`` (default: this repository) is typically a fresh clone, so the run includes the install
from scratch, as a new user's would. Writes ``benchmarks/results/NAME.{md,csv}`` (default
``demo_phantom_cpu``; another name keeps a record of another CPU kind beside it): the demo's own
``report.md`` and ``metrics.csv`` with a header saying how they were made.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
RESULTS = REPOSITORY / "benchmarks" / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", type=Path, default=REPOSITORY, help="where to run `make demo`")
    parser.add_argument("--name", default="demo_phantom_cpu", help="file name of the record, without suffix")
    parser.add_argument("--note", default="", help="recorded in the header (machine state, purpose)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPOSITORY))
    from latent.core.provenance import git_revision, machine_description

    checkout = args.checkout.resolve()
    load = os.getloadavg()[0]
    started = time.perf_counter()
    log = checkout / "demo_run.log"
    with log.open("w") as handle:
        status = subprocess.run(["make", "demo"], cwd=checkout, stdout=handle, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - started
    if status != 0:
        print(f"error: `make demo` in {checkout} exited with {status}; see {log}", file=sys.stderr)
        return status
    minutes, rest = divmod(round(seconds), 60)
    header = (f"<!-- written by benchmarks/record_demo.py: `make demo` in {checkout} at git {git_revision(checkout)}, "
              f"{datetime.now(timezone.utc):%Y-%m-%d}, {machine_description()}, 1-min load {load:.2f} at start; wall time {minutes} min {rest} s "
              f"(install included when the checkout had no .venv). {args.note} -->\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(header + (checkout / "demo_run" / "report.md").read_text())
    shutil.copyfile(checkout / "demo_run" / "metrics.csv", RESULTS / f"{args.name}.csv")
    print(header + (checkout / "demo_run" / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
