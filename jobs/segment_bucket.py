"""Segment a bucket of images with DeepLab + dense CRF on Ray Data; see ``--help``.

python jobs/segment_bucket.py                                  # embedded demo
ray job submit --working-dir . -- python jobs/segment_bucket.py s3://b/images --output s3://b/out
"""

import sys
from pathlib import Path

# With `ray job submit --working-dir .` the project is the working directory, not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import script

if __name__ == "__main__":
    script()
