"""--crf-backend end to end, through real Ray, the demo model, pydensecrf and the torch backend: a CPU run with
the torch backend gives the pydensecrf run's masks and columns, and an image the torch backend cannot allocate
for in a memory-capped inference actor (RLIMIT_AS) is refined by pydensecrf instead; the run commits."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.cli import build_parser, config_from_args
from pipeline.job import run
from tests.conftest import job_args, make_bucket, run_job
from tests.fault_hooks import fault_env

pytestmark = pytest.mark.slow


def _masks(run_dir):
    return pq.read_table(run_dir / "masks")


def _pixels(png: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(png)))


def test_cpu_run_with_the_torch_backend_matches_the_pydensecrf_run(ray_local, local_bucket, tmp_path):
    tables, errors, manifests = {}, {}, {}
    for backend in ("pydensecrf", "torch"):
        out = tmp_path / backend
        parser = build_parser()
        args = parser.parse_args(job_args(local_bucket, out, "r", "--crf-backend", backend))
        run(config_from_args(args, parser))
        tables[backend] = _masks(out / "run=r")
        errors[backend] = pq.read_table(out / "run=r" / "errors").select(["key", "stage", "error_type"]).to_pylist()
        manifests[backend] = json.loads((out / "run=r" / "manifest.json").read_text())
    assert tables["torch"].schema.equals(tables["pydensecrf"].schema)
    assert (
        errors["torch"]
        == errors["pydensecrf"]
        == [{"key": "corrupt.jpg", "stage": "decode", "error_type": errors["torch"][0]["error_type"]}]
    )
    resources = {b: manifests[b]["resources"] for b in manifests}
    assert resources["torch"]["crf_backend"] == "torch" and resources["pydensecrf"]["crf_backend"] == "pydensecrf"
    assert resources["torch"]["crf_fused"] and resources["torch"]["crf_actors"] is None
    rows = {b: {r["key"]: r for r in t.to_pylist()} for b, t in tables.items()}
    assert rows["torch"].keys() == rows["pydensecrf"].keys() and len(rows["torch"]) == 6
    same = total = 0
    for key, pyd in rows["pydensecrf"].items():
        torch_row = rows["torch"][key]
        assert torch_row["mask_pre_crf"] == pyd["mask_pre_crf"]  # the same inference in both runs
        assert all(
            row[c] is not None
            for row in (torch_row, pyd)
            for c in ("crf_ms", "crf_changed_fraction", "miou", "intersect", "union")
        )
        assert torch_row["crf_ms"] > 0 and torch_row["has_label"]
        mask, reference = _pixels(torch_row["mask"]), _pixels(pyd["mask"])
        same, total = same + int((mask == reference).sum()), total + mask.size
    assert same / total >= 0.999, same / total
    assert manifests["torch"]["metrics"]["miou"] == pytest.approx(manifests["pydensecrf"]["metrics"]["miou"], abs=1e-3)


def test_an_image_the_torch_crf_cannot_allocate_for_is_refined_by_pydensecrf(tmp_path):
    """A real failed allocation: each inference actor's address space is capped (tests/fault_hooks.py) so that
    the demo model and pydensecrf fit for a 600x800 noise image and the torch lattice does not (measured in
    one process: pydensecrf fails below ~700 MiB, torch succeeds above ~1400)."""
    bucket = make_bucket(tmp_path / "bucket", n=3, corrupt=False)
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (600, 800, 3), dtype=np.uint8)  # every pixel its own colour: most lattice points
    Image.fromarray(noise).save(bucket / "images" / "noise.png")
    proc = run_job(
        *job_args(bucket, tmp_path / "out", "f", "--crf-backend", "torch"), **fault_env(infer_memory_mib=1000)
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = tmp_path / "out" / "run=f"
    assert (run_dir / "_SUCCESS").exists()
    masks = {r["key"]: r for r in _masks(run_dir).to_pylist()}
    assert not (run_dir / "errors").exists() or not pq.read_table(run_dir / "errors").num_rows
    listed = sorted(p.relative_to(bucket / "images").as_posix() for p in (bucket / "images").rglob("*.*"))
    assert sorted(masks) == listed  # every key exactly once, as a mask
    assert "the torch backend could not allocate for noise.png (600x800" in proc.stderr
    assert "refining it with pydensecrf" in proc.stderr
    assert sum("could not allocate for" in line for line in proc.stderr.splitlines()) == 1  # only the big one
    noise_row = masks["noise.png"]
    assert noise_row["crf_ms"] > 0 and noise_row["mask_pre_crf"] and noise_row["crf_changed_fraction"] is not None

    # What the pydensecrf CPU backend gives for this image's probabilities (as the CRF pool receives them).
    from pipeline.config.sections import CRFParams, InferenceConfig
    from pipeline.crf.densecrf import dense_crf
    from pipeline.inference.multiscale import infer_batch, load_model
    from pipeline.models.deeplabv3plus import DEMO_WEIGHTS
    from pipeline.models.weights import normalisation
    from pipeline.rows.probs import decode_probs, encode_probs

    model, _, categories = load_model(DEMO_WEIGHTS.model, None)
    mean, std = normalisation(DEMO_WEIGHTS.mean, DEMO_WEIGHTS.std, "cpu")
    probs = infer_batch(model, [noise], mean=mean, std=std, config=InferenceConfig())[0]
    reference = dense_crf(
        noise, decode_probs(encode_probs(probs, "uint8"), "uint8", (len(categories), 600, 800)), CRFParams()
    )
    assert (_pixels(noise_row["mask"]) == reference).mean() >= 0.999
