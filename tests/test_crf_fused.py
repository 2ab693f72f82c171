"""The CRF inside the inference actor (pipeline/crf/fused.py): both backends refine the same probabilities,
the torch backend's input is the CRF pool's, and what counts as an allocation failure."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config.sections import CRFParams
from pipeline.crf.densecrf import Refinement, dense_crf
from pipeline.crf.fused import FusedCRF, ToRefine, allocation_failure
from pipeline.rows.batch import Rows
from pipeline.rows.probs import ENCODINGS, decode_probs, encode_probs, quantise_probs
from pipeline.rows.schema import add_columns
from tests.conftest import DEMO_BUCKET, demo_segmenter

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_quantised_probs_are_bitwise_what_the_crf_pool_decodes(encoding, device):
    probs = torch.rand(5, 37, 41, generator=torch.Generator().manual_seed(0)).softmax(0)
    probs[0, 0, :3] = torch.tensor([0.0, 1.0, 0.5 / 255])  # the ends and a rounding tie of uint8
    expected = decode_probs(encode_probs(probs, encoding), encoding, tuple(probs.shape))
    got = quantise_probs(probs.to(device), encoding)
    assert got.device.type == device and got.dtype == torch.float32
    np.testing.assert_array_equal(got.cpu().numpy(), expected)


def test_allocation_failures_are_told_from_other_errors():
    with pytest.raises(RuntimeError) as failed:  # a real failed host allocation: 2**60 bytes
        torch.empty(2**60, dtype=torch.uint8)
    assert allocation_failure(failed.value)
    assert allocation_failure(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"))
    assert allocation_failure(MemoryError())
    assert not allocation_failure(ValueError("probs must be (C, H, W)"))
    assert not allocation_failure(RuntimeError("expected scalar type Float but found Double"))


def _rows(n: int = 3, classes: int = 6):
    """Demo images with blocky, confident probabilities from their labels, as inference would emit them."""
    rows = []
    for i, path in enumerate(sorted((DEMO_BUCKET / "images").glob("*.jpg"))[:n]):
        image = np.array(Image.open(path).convert("RGB"))
        label = np.array(Image.open(DEMO_BUCKET / "labels" / f"{path.stem}.png"))
        onehot = torch.from_numpy(np.eye(classes, dtype=np.float32)[np.where(label == 255, 0, label)]).permute(2, 0, 1)
        coarse = torch.nn.functional.avg_pool2d(onehot[None], 8, ceil_mode=True)
        up = torch.nn.functional.interpolate(coarse, size=label.shape, mode="bilinear", align_corners=False)[0]
        rows.append((i, image, (6.0 * up).softmax(0)))
    return rows


def _columns(n: int) -> dict[str, list]:
    return add_columns(
        {
            "key": [f"k{i}" for i in range(n)],
            "error_stage": [""] * n,
            "error_type": [""] * n,
            "error_message": [""] * n,
            "probs": [b""] * n,
        },
        "crf",
        n,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_torch_backend_fills_the_columns_the_pydensecrf_backend_fills_with_the_same_masks(device):
    rows = _rows()
    outs = {}
    for backend in ("pydensecrf", "torch"):
        crf = FusedCRF(
            Refinement(params=CRFParams(), encoding="uint8", num_classes=6, node_id="node"),
            backend=backend,
            device=torch.device(device if backend == "torch" else "cpu"),
        )
        outs[backend] = _columns(len(rows))
        crf(Rows(outs[backend]), [ToRefine(i, image, p.to(crf.device), None) for i, image, p in rows])
    for out in outs.values():
        assert out["error_stage"] == [""] * len(rows) and out["crf_node"] == ["node"] * len(rows)
        assert all(ms > 0 for ms in out["crf_ms"])
    for (i, image, p), torch_mask, pyd_mask in zip(
        rows, outs["torch"]["mask_crf"], outs["pydensecrf"]["mask_crf"], strict=True
    ):
        reference = dense_crf(image, decode_probs(encode_probs(p, "uint8"), "uint8", tuple(p.shape)))
        assert pyd_mask == reference.tobytes()
        same = (np.frombuffer(torch_mask, np.uint8) == reference.ravel()).mean()
        assert same >= 0.999, (i, same)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_gpu_inference_actor_refines_on_the_gpu_as_the_cpu_pool_would():
    """The fused GPU plan's Segmenter (torch CRF on the GPU) against the CPU plan's (pydensecrf): same rows."""
    from pipeline.io.decode import decode_batch
    from pipeline.models.deeplabv3plus import DEMO_WEIGHTS as W

    uris = sorted(str(p) for p in (DEMO_BUCKET / "images").glob("*.jpg"))[:4]
    batch = decode_batch(
        {"key": np.array(uris), "uri": np.array(uris), "label_uri": np.array([""] * len(uris))},
        storage_options={},
        num_classes=len(W.categories),
        max_pixels=None,
    )
    tables = {}
    for backend, gpu in (("torch", True), ("pydensecrf", False)):
        seg = demo_segmenter(use_gpu=gpu, crf=CRFParams(), crf_backend=backend)
        assert seg.device.type == ("cuda" if gpu else "cpu")
        tables[backend] = seg(dict(batch)).to_pylist()
    for gpu_row, cpu_row in zip(tables["torch"], tables["pydensecrf"], strict=True):
        assert gpu_row.keys() == cpu_row.keys() and not gpu_row["error_stage"] and gpu_row["crf_ms"] > 0
        gpu_mask, cpu_mask = (np.array(Image.open(io.BytesIO(r["mask"]))) for r in (gpu_row, cpu_row))
        assert (gpu_mask == cpu_mask).mean() >= 0.999


def test_fused_and_pooled_layouts_write_the_same_rows():
    """The CPU plan (CRF inside the inference actor) and the GPU plan's CPU pool (inference, then
    CRFRefiner) give the same masks and metrics for the same labelled images."""
    import pyarrow as pa

    from pipeline.crf.densecrf import CRFRefiner, CRFSpec
    from pipeline.io.decode import decode_batch
    from pipeline.models.deeplabv3plus import DEMO_WEIGHTS as W

    images = sorted((DEMO_BUCKET / "images").glob("*.jpg"))[:4]
    batch = decode_batch(
        {
            "key": np.array([p.name for p in images]),
            "uri": np.array([str(p) for p in images]),
            "label_uri": np.array([str(DEMO_BUCKET / "labels" / f"{p.stem}.png") for p in images]),
        },
        storage_options={},
        num_classes=len(W.categories),
        max_pixels=None,
    )
    fused = demo_segmenter(actor_memory_mib=2048, crf=CRFParams(), crf_backend="pydensecrf")(batch)
    probs = demo_segmenter(actor_memory_mib=2048, crf_follows=True)(batch)
    pooled = CRFRefiner(CRFSpec(params=CRFParams(), weights=W, run_id="t", actor_memory_mib=2048))(probs)
    assert isinstance(fused, pa.Table) and fused.column("has_label").to_pylist() == [True] * 4
    timing = {"infer_ms", "crf_ms", "infer_node", "crf_node"}
    columns = [c for c in fused.column_names if c not in timing]
    assert pooled.column_names == fused.column_names
    assert pooled.select(columns).equals(fused.select(columns))
