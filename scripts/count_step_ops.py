"""Count the ATen operations one training step (loss + backward) dispatches, per case.

On a GPU most of them are kernel launches, and a step of the paper's U-Net is bound by how
fast the host issues them (EXPERIMENT_LOG, "First GPU measurements"), so the count is a
device-independent measure of that cost which any machine can take (views launch nothing and
are listed apart).  Runs on CPU; under --precision bf16 with CPU autocast, whose casting
policy for convolutions matches CUDA's.

    PYTHONPATH=. .venv/bin/python scripts/count_step_ops.py --precision bf16 --ratios 0.25,1.0
"""

import argparse
import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from zoo.bench.steps import data_signature, flow_matching_loss, meanflow_loss, synthetic_batch
from zoo.config.loading import load_config
from zoo.losses import Loss
from zoo.models import build_model
from zoo.models.base import FlowModel

# Operations that only re-describe memory: no kernel on any device.
VIEWS = {
    "aten.view", "aten._unsafe_view", "aten.reshape", "aten.expand", "aten.unsqueeze", "aten.squeeze", "aten.t",
    "aten.transpose", "aten.permute", "aten.detach", "aten.alias", "aten.slice", "aten.select", "aten.split",
    "aten.split_with_sizes", "aten.chunk", "aten.unbind", "aten.as_strided", "aten.is_same_size",
    "aten._has_same_storage_numel", "aten.lift_fresh",
}  # fmt: skip


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_step(model: FlowModel, loss_fn: Loss, x: torch.Tensor, y: torch.Tensor | None, precision: str) -> collections.Counter:
    draws = loss_fn.draw(model, x, y, torch.Generator().manual_seed(0))
    with OpCounter() as counter:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss, _ = loss_fn.evaluate(model, x, draws)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.counts


def kernels(counts: collections.Counter) -> int:
    return sum(n for name, n in counts.items() if name not in VIEWS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cifar10")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--jvp-precision", choices=["fp32", "tf32", "bf16"], default="tf32")
    parser.add_argument("--mode", default="fused", help="the MeanFlow JVP mode counted")
    parser.add_argument("--ratios", default="0.25,1.0")
    parser.add_argument("--top", type=int, default=15, help="operations listed for the first ratio's extra")
    args = parser.parse_args()

    cfg = load_config(args.preset, [f"loss.jvp_precision={args.jvp_precision}"])
    data_shape, num_classes = data_signature(cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg.model, data_shape, num_classes).train()
    batch = synthetic_batch(model, args.batch_size, torch.device("cpu"), cfg.loss)
    fm = count_step(model, flow_matching_loss(cfg.loss), batch.x, batch.y, args.precision)
    print(f"{args.preset}, batch {args.batch_size}, {args.precision}, JVP precision {args.jvp_precision}")
    print(f"{'case':16s} {'ops':>6s} {'non-view':>9s}")
    print(f"{'FM step':16s} {sum(fm.values()):6d} {kernels(fm):9d}")
    extras = []
    for ratio in (float(r) for r in args.ratios.split(",")):
        counts = count_step(model, meanflow_loss(cfg.loss, args.mode, ratio), batch.x, batch.y, args.precision)
        print(f"{f'{args.mode} @{ratio:g}':16s} {sum(counts.values()):6d} {kernels(counts):9d}")
        extras.append(counts - fm)
    print("non-view operations the first ratio adds to the FM step, most frequent first:")
    for name, n in [(k, v) for k, v in extras[0].most_common() if k not in VIEWS][: args.top]:
        print(f"  {name:36s} {n:5d}")


if __name__ == "__main__":
    main()
