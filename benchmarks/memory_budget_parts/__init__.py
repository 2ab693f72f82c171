"""The parts of benchmarks/memory_budget.py: the test photo, fresh-process runs, quality."""
