"""The CPU plan (each inference actor reads, decodes and refines its own images) and the split plan
(a decode pool before the inference actors) write the same rows for the same inputs, through real
Ray Data, the demo model and pydensecrf."""

from __future__ import annotations

from dataclasses import replace

import pyarrow.parquet as pq
import pytest

from pipeline.config.sections import CRFParams, JobConfig
from pipeline.dag.runner import consume
from pipeline.dag.stages import DagSpec, Resources, build_dataset
from pipeline.io.storage import list_inputs
from pipeline.job import resolve_weights
from tests.conftest import DEMO_BUCKET, demo_config

pytestmark = pytest.mark.slow

TIMINGS = ("infer_ms", "crf_ms")  # wall-clock times differ between any two runs


def demo_bucket_config(out) -> JobConfig:
    """The demo bucket with its labels and the CRF on, written under ``out``."""
    images, labels = str(DEMO_BUCKET / "images"), str(DEMO_BUCKET / "labels")
    return demo_config(input_uri=images, output_uri=str(out), labels_uri=labels, crf=CRFParams())


def test_decoding_in_the_inference_actors_writes_what_a_decode_pool_does(ray_local, tmp_path):
    config = demo_bucket_config(tmp_path)
    weights = resolve_weights(config)
    inputs = list_inputs(config.input_uri, config.labels_uri, limit=6)
    fused = Resources.resolve(config, {"CPU": 2.0})
    assert fused.decode_fused and fused.crf_fused and fused.decode_actors == (0, 0)
    split = replace(fused, decode_fused=False, decode_actors=(1, 1), infer_cpus=0.875)
    tables = {}
    for name, plan in (("fused", fused), ("split", split)):
        dag = DagSpec(config=config, weights=weights, resources=plan, run_uri=str(tmp_path / name))
        stats = consume(build_dataset(dag, inputs), weights.num_classes, None)
        assert (stats.images, stats.errors) == (6, 0)
        tables[name] = pq.read_table(tmp_path / name / "masks").sort_by("key").drop_columns(list(TIMINGS))
    assert tables["fused"].column("has_label").to_pylist() == [True] * 6
    assert tables["fused"].equals(tables["split"])


def test_result_rows_as_tasks_write_what_the_inference_actor_writes(ray_local, tmp_path):
    """The GPU plan's shape on CPUs (a decode pool, the torch CRF fused in the inference actor): its
    result rows made by Ray Data tasks after the actor equal those the actor makes itself."""
    from pipeline.dag.stages import dataset_stats

    config = demo_bucket_config(tmp_path)
    weights = resolve_weights(config)
    inputs = list_inputs(config.input_uri, config.labels_uri, limit=6)
    cpu = Resources.resolve(config, {"CPU": 2.0})
    in_actor = replace(cpu, decode_fused=False, decode_actors=(1, 1), infer_cpus=0.875, crf_backend="torch")
    tables, stages = {}, {}
    for name, plan in (("in_actor", in_actor), ("apart", replace(in_actor, rows_apart=True))):
        ds = build_dataset(
            DagSpec(config=config, weights=weights, resources=plan, run_uri=str(tmp_path / name)), inputs
        )
        stats = consume(ds, weights.num_classes, None)
        assert (stats.images, stats.errors) == (6, 0)
        stages[name] = [s["stage"] for s in dataset_stats(ds)]
        tables[name] = pq.read_table(tmp_path / name / "masks").sort_by("key").drop_columns(list(TIMINGS))
    assert "MapBatches(result_table)" in stages["apart"] and "MapBatches(result_table)" not in stages["in_actor"]
    assert all(r["miou"] is not None and r["mask"] for r in tables["apart"].to_pylist())
    assert tables["in_actor"].equals(tables["apart"])
