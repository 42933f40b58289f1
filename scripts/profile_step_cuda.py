"""Where a training step's time goes on a GPU: FM step vs MeanFlow fused step, paper U-Net, bf16.

For each step: wall time (median of 10 after warm-up), GPU busy time (sum of CUDA kernel time
from torch.profiler), the number of kernel launches, and the top kernels.  GPU busy time far
below wall time means the step is launch/dispatch-bound (EXPERIMENT_LOG, first GPU measurements).
Also times the FM step with channels-last activations, to see what the memory format is worth.

    python3 scripts/profile_step_cuda.py --batch-size 128 --out outputs/profile-cuda
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from zoo.bench.steps import data_signature, flow_matching_loss, meanflow_loss, synthetic_batch, training_step_fn
from zoo.devices import enable_cuda_tf32
from zoo.config.loading import load_config
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


def kernel_profile(run) -> tuple[float, int, list[tuple[str, float, int]]]:
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    events = prof.key_averages()
    # Kernel-level events only: operator-level events repeat their kernels' device time.
    busy = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    top = sorted(((e.key, e.self_device_time_total / 1e3, e.count) for e in kernels), key=lambda row: -row[1])[:8]
    return busy, launches, top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    steps = {
        "fm": training_step_fn(model, optimizer, flow_matching_loss(cfg.loss), batch, "bf16"),
        "fused@0.25": training_step_fn(model, optimizer, meanflow_loss(cfg.loss, "fused", 0.25), batch, "bf16"),
        "fused@1.0": training_step_fn(model, optimizer, meanflow_loss(cfg.loss, "fused", 1.0), batch, "bf16"),
    }
    report = {}
    for name, run in steps.items():
        for _ in range(3):
            run()
        ms = wall_ms(run)
        busy, launches, top = kernel_profile(run)
        report[name] = {"wall_ms": ms, "gpu_busy_ms": busy, "launches": launches, "top": top}
        print(f"{name:12s} wall {ms:7.1f} ms   GPU busy {busy:7.1f} ms ({100 * busy / ms:4.1f}%)   launches {launches}")
        for key, kernel_ms, count in top[:5]:
            print(f"    {kernel_ms:7.2f} ms  x{count:<5d} {key[:90]}")
    model_cl = model.to(memory_format=torch.channels_last)
    batch.z, batch.x, batch.v = (t.contiguous(memory_format=torch.channels_last) for t in (batch.z, batch.x, batch.v))
    fm_cl = training_step_fn(model_cl, optimizer, flow_matching_loss(cfg.loss), batch, "bf16")
    for _ in range(3):
        fm_cl()
    report["fm_channels_last"] = {"wall_ms": wall_ms(fm_cl)}
    print(f"fm channels-last wall {report['fm_channels_last']['wall_ms']:.1f} ms")
    (args.out / "profile.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
