"""The demo: synthetic scenes and the bundled bucket and checkpoint."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"  # files shipped with the package
DEMO_BUCKET = ASSETS / "demo_bucket"
