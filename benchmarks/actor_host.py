"""Host CPU per image of each stage of the GPU plan, with the device's work replaced by a stub.

    python benchmarks/actor_host.py                       # 0.25 MP images, batches of 16, 3 rounds
    python benchmarks/actor_host.py --images 32 --rounds 1   # a dry run of this script

The GPU plan (pipeline/dag/stages.py with one GPU) runs a decode pool, the inference actor (the
forward pass, then the torch CRF fused on the GPU) and writers. Here each stage's own callable
class runs in this process, as its Ray actor would, on batches the real ``Decoder`` made from
JPEG images and PNG labels: the inference actor's forward pass (``infer_batch``), its device-side
reductions (``top_class``, ``uncertainty``) and the torch CRF are replaced by stubs that sleep a
fixed latency and return precomputed tensors, so its CPU time (``time.process_time``: every thread
of this process) is the host work a GPU actor does per image. The stubs live here only.

The feed rate one GPU actor could sustain on a node of N cores follows from those costs: the GPU
actor's host work holds one core (``1000 / host ms`` images/s), and the CPU stages (decode, result
rows when they run in their own pool, write) share the other N - 1 cores less Ray's own processes
(``--ray-cores``, measured by benchmarks/ceiling.py's floor on this machine).
Results: benchmarks/results/actor-host-<time>.json (harness.save).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

NAME = "actor-host"


def make_bucket(root: Path, count: int, side: int) -> None:
    """``count`` side x side JPEG scenes and their PNG labels (32 distinct scenes, repeated)."""
    from PIL import Image

    from pipeline.demo.synthetic import SceneSpec, make_scene

    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    for i in range(count):
        image, label = make_scene(7_000_000 + i % 32, SceneSpec(height=side, width=side))
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=90)
        (root / "images" / f"img-{i:05d}.jpg").write_bytes(buffer.getvalue())
        Image.fromarray(label).save(root / "labels" / f"img-{i:05d}.png")


class Stubs:
    """The device's work as fixed latencies: the forward pass per batch, the CRF per batch."""

    def __init__(self, num_classes: int, side: int, forward_ms: float, crf_ms: float) -> None:
        import torch

        from pipeline.demo.synthetic import SceneSpec, make_scene
        from pipeline.evaluation.metrics import uncertainty_summary

        # A scene's own classes as the "prediction": masks compress as real ones do (noise would not).
        label = torch.from_numpy(make_scene(7_000_000, SceneSpec(height=side, width=side))[1].astype("int64"))
        label[label >= num_classes] = 0
        self.probs = torch.full((num_classes, side, side), 0.2 / (num_classes - 1))
        self.probs.scatter_(0, label[None], 0.8)
        self.top, self.mask = self.probs.max(dim=0)
        self.mask = self.mask.to(torch.uint8)
        self.summary = uncertainty_summary(0.9, 0.3, 0.1, num_classes)
        self.forward_s, self.crf_s = forward_ms / 1000.0, crf_ms / 1000.0

    def install(self) -> None:
        import pipeline.crf.fused as fused
        import pipeline.inference.segmenter as segmenter

        def infer_batch(model, images, *, mean, std, config, seconds=None):
            time.sleep(self.forward_s)
            if seconds is not None:
                seconds.extend([self.forward_s / len(images)] * len(images))
            return [self.probs for _ in images]

        def crf_batch(images, probs, params):
            time.sleep(self.crf_s)
            return [self.mask for _ in images]

        segmenter.infer_batch = infer_batch
        segmenter.top_class = lambda probs: (self.top, self.mask)
        segmenter.uncertainty = lambda probs, threshold, top=None: dict(self.summary)
        fused.quantise_probs = lambda probs, encoding: probs
        fused.dense_crf_torch_batch = crf_batch
        fused.FusedCRF.batched = property(lambda self: True)  # merged lattices, as on a GPU


def cpu_ms(fn, batch, n: int) -> tuple[float, object]:
    start = time.process_time()
    out = fn(batch)
    return (time.process_time() - start) * 1000.0 / n, out


def measure(args: argparse.Namespace, root: Path) -> dict:
    from dataclasses import replace

    import numpy as np

    from pipeline.config.sections import ComputeConfig, CRFParams, JobConfig
    from pipeline.dag.stages import DagSpec, Resources, _Stage, keys_per_block
    from pipeline.io.storage import list_inputs
    from pipeline.job import resolve_weights
    from pipeline.outputs.writer import PartWriter

    config = JobConfig(
        input_uri=str(root / "images"),
        output_uri=str(root / "out"),
        labels_uri=str(root / "labels"),
        model=harness.MODEL,
        weights_uri=None,
        run_id="bench",
        crf=CRFParams(),
        compute=ComputeConfig(batch_size=args.batch_size),
    )
    weights = resolve_weights(config)
    gpu_node = {"CPU": float(args.cores[-1]), "GPU": 1.0}
    resources = Resources.resolve(config, [gpu_node])
    assert resources.use_gpu and resources.crf_fused and not resources.decode_fused, resources
    inputs = list_inputs(config.input_uri, config.labels_uri)
    dag = DagSpec(config=config, weights=weights, resources=resources, run_uri=str(root / "out" / "run=bench"))
    stage = _Stage(dag=dag, blocks=keys_per_block(len(inputs), args.batch_size), fault_tolerance={})

    Stubs(weights.num_classes, args.side, args.forward_ms, args.crf_ms).install()
    from ray.data.block import BlockAccessor

    from pipeline.evaluation.per_image import result_table
    from pipeline.inference.segmenter import Segmenter
    from pipeline.io.decode import Decoder

    decode = Decoder(**stage.decode(inputs)["fn_constructor_kwargs"])
    write = PartWriter(**stage.write()["fn_constructor_kwargs"])
    spec = stage.infer(inputs)["fn_constructor_kwargs"]["spec"]
    plans = {  # the inference actor emitting the result rows itself (before), or the rows as tasks after it
        "rows_in_actor": Segmenter(replace(spec, rows_follow=False)),
        "rows_apart": Segmenter(replace(spec, rows_follow=True)),
    }
    rows_kwargs = stage.rows()["fn_kwargs"]
    keys = inputs.keys.to_pylist()
    costs: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for start in range(0, len(keys), args.batch_size):
            chunk = keys[start : start + args.batch_size]
            n = len(chunk)
            ms, decoded = cpu_ms(decode, {"key": np.array(chunk, dtype=object)}, n)
            costs.setdefault("decode", []).append(ms)
            for plan, infer in plans.items():
                # The actor's host work includes turning its output into a block (Ray Data does it there).
                ms, block = cpu_ms(lambda b, infer=infer: BlockAccessor.batch_to_block(infer(b)), decoded, n)
                costs.setdefault(f"{plan}:infer_host", []).append(ms)
                if plan == "rows_apart":
                    ms, block = cpu_ms(
                        lambda b: result_table(BlockAccessor.for_block(b).to_numpy(), **rows_kwargs), block, n
                    )
                    costs.setdefault("rows_apart:rows", []).append(ms)
            ms, _ = cpu_ms(write, block, n)
            costs.setdefault("write", []).append(ms)
    per_image = {stage: harness.median(values[len(values) // 4 :]) for stage, values in costs.items()}
    feed: dict[str, dict] = {}
    for plan in plans:
        host = per_image[f"{plan}:infer_host"]
        cpu_stages = per_image["decode"] + per_image["write"] + per_image.get(f"{plan}:rows", 0.0)
        for cores in args.cores:
            bounds = {
                "gpu_actor_host": 1000.0 / host,
                "cpu_stages": max(0.0, cores - 1 - args.ray_cores) * 1000.0 / cpu_stages,
                "device": 1000.0 / ((args.forward_ms + args.crf_ms) / args.batch_size),
            }
            feed[f"{plan}:{cores}_cores"] = {k: round(v, 1) for k, v in bounds.items()} | {
                "images_per_s": round(min(bounds.values()), 1)
            }
    return {"ms_per_image": {k: round(v, 3) for k, v in per_image.items()}, "feed_rate": feed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--side", type=int, default=500, help="square images of side x side pixels (0.25 MP)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--forward-ms", type=float, default=40.0, help="the stub forward pass, per batch")
    parser.add_argument("--crf-ms", type=float, default=40.0, help="the stub torch CRF, per batch")
    parser.add_argument("--cores", type=int, nargs="+", default=[8, 16], help="node sizes for the feed rate")
    parser.add_argument("--ray-cores", type=float, default=0.15, help="cores Ray's own processes take")
    harness.add_results_arg(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="actor-host-") as tmp:
        root = Path(tmp)
        make_bucket(root, args.images, args.side)
        results = measure(args, root)
    harness.log(NAME, str(results))
    harness.save(NAME, args, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
