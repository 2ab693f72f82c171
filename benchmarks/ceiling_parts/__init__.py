"""The parts of benchmarks/ceiling.py: process-tree sampling, the loop and job runs, the report."""

import datetime
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "ceiling.py"  # the entry script; the harness runs it again
DOCS = ROOT / "docs" / "benchmarks.md"
PYTHON = sys.executable
DATE = datetime.date.today().isoformat()  # the day of the run, in its report
SKIP = 0.10  # steady state: after the first 10 % of the images
SAMPLE_S = 0.25
MODEL = "deeplabv3plus_demo"
