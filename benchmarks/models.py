"""Size and speed of every DeepLab builder at 513x513 (the papers' PASCAL VOC crop size).

    python benchmarks/models.py                                     # every model (slow on CPU)
    python benchmarks/models.py --models deeplabv3_mobilenet_v3_large,deeplabv3plus_demo

Prints a Markdown table: parameters, GFLOPs (torch's FlopCounterMode, which counts a
multiply-add as 2 FLOPs) for one 513x513 image, CPU latency at batch 1 with ``--threads``
threads (median of ``--repeats`` timed runs after one warm-up), and, when CUDA is available,
GPU latency and throughput at batch 8 under bf16 autocast (fp16 where bf16 is unsupported).
Each model runs with its builder's defaults (output stride, number of classes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.models import MODEL_BUILDERS


def gflops(model: torch.nn.Module, size: int) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def timed(fn, repeats: int, sync=lambda: None) -> float:
    """Median seconds of ``repeats`` calls after one untimed warm-up call."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_ms(model: torch.nn.Module, size: int, repeats: int) -> float:
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        return timed(lambda: model(x), repeats) * 1000


def gpu_cell(model: torch.nn.Module, size: int, batch: int, repeats: int) -> str:
    if not torch.cuda.is_available():
        return "n/a (no GPU)"
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    model = model.cuda().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device="cuda").contiguous(memory_format=torch.channels_last)

    def run():
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
            model(x)

    run()  # cudnn picks its algorithms on the first call of each shape
    seconds = timed(run, max(repeats, 10), torch.cuda.synchronize)
    model.cpu()
    torch.cuda.empty_cache()
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    return f"{seconds / batch * 1000:.1f} ms/img, {batch / seconds:.0f} img/s ({name})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODEL_BUILDERS), help="comma-separated builder names")
    parser.add_argument("--size", type=int, default=513)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default: 2)")
    parser.add_argument("--repeats", type=int, default=2, help="timed CPU runs per model (default: 2)")
    parser.add_argument("--gpu-batch", type=int, default=8)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - set(MODEL_BUILDERS))
    if unknown:
        parser.error(f"unknown models {', '.join(unknown)}; choose from {', '.join(MODEL_BUILDERS)}")

    torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    gpu_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(
        f"{args.size}x{args.size} input; CPU: batch 1, {args.threads} threads, median of {args.repeats}; "
        f"GPU ({gpu_name}): batch {args.gpu_batch}, autocast\n"
    )
    print("| model | OS | params (M) | GFLOPs | CPU ms/img | GPU |")
    print("|---|---:|---:|---:|---:|---|")
    for name in names:
        torch.manual_seed(0)
        model = MODEL_BUILDERS[name]().eval()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        flops = gflops(model, args.size)
        cpu = cpu_ms(model, args.size, args.repeats)
        gpu = gpu_cell(model, args.size, args.gpu_batch, args.repeats)
        print(f"| {name} | {model.output_stride} | {params:.1f} | {flops:.1f} | {cpu:.0f} | {gpu} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
