"""Where a training step's time goes on a GPU: FM step vs MeanFlow fused step, paper U-Net, bf16.

For each step: wall time (median of 10 after warm-up), GPU busy time (sum of CUDA kernel time
from torch.profiler), the number of kernel launches, the top kernels, and the kernel time by
category (matrix: convolutions and GEMMs; casts and layout copies; element-wise; reductions;
norms; other) with what each MeanFlow step adds to the FM step's.  GPU busy time far below wall
time means the step is launch/dispatch-bound (EXPERIMENT_LOG, first GPU measurements); a step
replayed from a CUDA graph (train.cuda_graph) runs the same kernels without the host's gaps, so
the categories of these eager steps approximate where a captured MeanFlow step's extra time goes
(an approximation: a replay's kernels can run faster back to back, on clocks that never idle).
The fused steps run with the tangent in TF32 (the default) and in bf16 (loss.jvp_precision=bf16).
Also times the FM step with channels-last activations, to see what the memory format is worth.

    python3 scripts/profile_step_cuda.py --batch-size 128 --out outputs/profile-cuda
"""

import argparse
import collections
import json
import re
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from zoo.bench.steps import (
    data_signature,
    flow_matching_loss,
    meanflow_loss,
    synthetic_batch,
    training_step_fn,
)
from zoo.config.loading import load_config
from zoo.devices import enable_cuda_tf32
from zoo.models import build_model
from zoo.training.optim import build_optimizer


def wall_ms(run, repeats: int = 10) -> float:
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


# First match wins: a cast is an element-wise kernel whose functor is a copy.  "copies" also holds
# torch.cat, clone/contiguous and index_copy: the top kernels of it and of "other" are printed,
# so a misfiled kernel shows.
KERNEL_CATEGORIES = [
    ("copies", re.compile(r"copy|CatArray|nchwToNhwc|nhwcToNchw|transpose|permute", re.I)),
    (
        "matrix",
        re.compile(r"conv|cudnn|gemm|nvjet|xmma|cutlass|wgrad|dgrad|fprop|sm90|flash|fmha|attention", re.I),
    ),
    # group_sums and tangent: zoo's Triton group-norm tangent kernels (loss.jvp_kernels=auto uses them on
    # CUDA; with loss.jvp_kernels=torch the PyTorch operations show under element-wise/reduction).
    (
        "norm",
        re.compile(
            r"group_?norm|layer_?norm|RowwiseMoments|ComputeFused|Welford|ComputeInternalGradients|"
            r"BackwardFusedParams|GammaBeta|^group_sums|^tangent\b",
            re.I,
        ),
    ),
    ("reduction", re.compile(r"reduce", re.I)),
    ("element-wise", re.compile(r"elementwise|vectorized|unrolled|dropout", re.I)),
]
LISTED_CATEGORIES = ("copies", "other")


def kernel_category(name: str) -> str:
    return next((label for label, pattern in KERNEL_CATEGORIES if pattern.search(name)), "other")


def kernel_profile(
    run,
) -> tuple[float, int, list[tuple[str, float, int]], dict[str, float], list[tuple[str, float, int]]]:
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    events = prof.key_averages()
    # Kernel-level events only: operator-level events repeat their kernels' device time.
    busy = (
        sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3
    )
    launches = sum(
        e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
    )
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    top = sorted(
        ((e.key, e.self_device_time_total / 1e3, e.count) for e in kernels), key=lambda row: -row[1]
    )[:8]
    categories: collections.Counter[str] = collections.Counter()
    for e in kernels:
        categories[kernel_category(e.key)] += e.self_device_time_total / 1e3
    listed = sorted(
        (
            (f"[{kernel_category(e.key)}] {e.key}", e.self_device_time_total / 1e3, e.count)
            for e in kernels
            if kernel_category(e.key) in LISTED_CATEGORIES
        ),
        key=lambda row: -row[1],
    )[:6]
    return busy, launches, top, dict(categories), listed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("outputs/profile-cuda"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    enable_cuda_tf32()
    cfg = load_config("cifar10", [])
    shape, classes = data_signature(cfg.data)
    device = torch.device("cuda")
    model = build_model(cfg.model, shape, classes).to(device).train()
    optimizer = build_optimizer(model, cfg.optim)
    batch = synthetic_batch(model, args.batch_size, device, cfg.loss)
    bf16_tangent = cfg.loss.model_copy(update={"jvp_precision": "bf16"})
    steps = {
        "fm": training_step_fn(model, optimizer, flow_matching_loss(cfg.loss), batch, "bf16"),
        "fused@0.25": training_step_fn(
            model, optimizer, meanflow_loss(cfg.loss, "fused", 0.25), batch, "bf16"
        ),
        "fused@1.0": training_step_fn(model, optimizer, meanflow_loss(cfg.loss, "fused", 1.0), batch, "bf16"),
        "fused@0.25 bf16 JVP": training_step_fn(
            model, optimizer, meanflow_loss(bf16_tangent, "fused", 0.25), batch, "bf16"
        ),
        "fused@1.0 bf16 JVP": training_step_fn(
            model, optimizer, meanflow_loss(bf16_tangent, "fused", 1.0), batch, "bf16"
        ),
    }
    report = {}
    for name, run in steps.items():
        for _ in range(3):
            run()
        ms = wall_ms(run)
        busy, launches, top, categories, listed = kernel_profile(run)
        report[name] = {
            "wall_ms": ms,
            "gpu_busy_ms": busy,
            "launches": launches,
            "top": top,
            "categories": categories,
            "copies_and_other": listed,
        }
        print(
            f"{name:20s} wall {ms:7.1f} ms   GPU busy {busy:7.1f} ms ({100 * busy / ms:4.1f}%)   "
            f"launches {launches}"
        )
        for key, kernel_ms, count in top[:5] + listed:
            print(f"    {kernel_ms:7.2f} ms  x{count:<5d} {key[:90]}")
    labels = [label for label, _ in KERNEL_CATEGORIES] + ["other"]
    print("kernel ms by category (MeanFlow rows: + over the FM step)")
    print(f"{'step':20s}" + "".join(f"{label:>14s}" for label in labels))
    fm_categories = report["fm"]["categories"]
    for name, row in report.items():
        cells = (
            row["categories"].get(label, 0.0) - (0.0 if name == "fm" else fm_categories.get(label, 0.0))
            for label in labels
        )
        print(f"{name:20s}" + "".join(f"{value:14.1f}" for value in cells))
    model_cl = model.to(memory_format=torch.channels_last)
    batch.z, batch.x, batch.v = (
        t.contiguous(memory_format=torch.channels_last) for t in (batch.z, batch.x, batch.v)
    )
    fm_cl = training_step_fn(model_cl, optimizer, flow_matching_loss(cfg.loss), batch, "bf16")
    for _ in range(3):
        fm_cl()
    report["fm_channels_last"] = {"wall_ms": wall_ms(fm_cl)}
    print(f"fm channels-last wall {report['fm_channels_last']['wall_ms']:.1f} ms")
    (args.out / "profile.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
