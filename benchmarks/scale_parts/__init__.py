"""The parts of benchmarks/scale.py: measured steps, the step runner, synthetic runs, tables."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "scale.py"  # the entry script, also what each measured step runs
OLD_TREE = Path("/work/wt-old")
ROWS_PER_PART = 1000
NUM_CLASSES = 6
CATEGORIES = ("background", "disc", "box", "triangle", "ring", "bar")  # the demo checkpoint's
POOL = 256  # distinct mask PNGs / scenes reused by the synthetic data
CHANGED_PERCENT = 5  # masks that differ in the second run of a size
ERROR_EVERY = 50  # every 50th part has 2 error rows
SECTION = "## Scale: the driver coordinates (benchmarks/scale.py)"
MIB = 2**20
SIDES = ("before", "after")
