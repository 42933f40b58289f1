r"""Count the ATen operations one training step (loss + backward) dispatches, and the bytes they
move, per case.

On a GPU most operations are kernel launches: an eager step of the paper's U-Net is bound by how
fast the host issues them (EXPERIMENT_LOG, "First GPU measurements"), so the count is a
device-independent measure of that cost which any machine can take (views launch nothing and
are listed apart).  A step replayed from a CUDA graph no longer pays the launches; its
element-wise kernels are then bound by memory traffic, estimated here by operand bytes: each
operation's tensor arguments and results, each tensor counted once.  That is what an
element-wise kernel moves; it overcounts operands never read (the template of empty_like, the
destination of an in-place fill or copy) and undercounts kernels that pass over their input
more than once (native group norm, softmax).  Convolutions and matrix products are listed
apart: they are bound by arithmetic.  Runs on CPU, under --precision bf16 with CPU autocast
(the same bf16 policy for convolutions and matrix products as CUDA's), and with nn.Dropout as
the one native_dropout it is on CUDA (on a CPU F.dropout is four operations).

    PYTHONPATH=. .venv/bin/python scripts/count_step_ops.py --precision bf16 --ratios 0.25,1.0 \
        model.channels=32
"""

import argparse
import collections
import dataclasses
import unittest.mock

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from zoo.bench.steps import data_signature, flow_matching_loss, meanflow_loss, synthetic_batch
from zoo.config.loading import load_config
from zoo.losses import Loss
from zoo.models import build_model
from zoo.models.base import FlowModel

# Operations that only re-describe memory: no kernel on any device.
VIEWS = {
    "aten.view",
    "aten._unsafe_view",
    "aten.reshape",
    "aten.expand",
    "aten.unsqueeze",
    "aten.squeeze",
    "aten.t",
    "aten.transpose",
    "aten.permute",
    "aten.detach",
    "aten.alias",
    "aten.slice",
    "aten.select",
    "aten.split",
    "aten.split_with_sizes",
    "aten.chunk",
    "aten.unbind",
    "aten.as_strided",
    "aten.is_same_size",
    "aten._has_same_storage_numel",
    "aten.lift_fresh",
}


# Operations bound by arithmetic rather than memory traffic.
MATRIX = {
    "aten.convolution",
    "aten.convolution_backward",
    "aten.mm",
    "aten.addmm",
    "aten.bmm",
    "aten.baddbmm",
    "aten._scaled_dot_product_flash_attention",
    "aten._scaled_dot_product_efficient_attention",
    "aten._scaled_dot_product_cudnn_attention",
    "aten._scaled_dot_product_flash_attention_for_cpu",
    "aten._scaled_dot_product_flash_attention_for_cpu_backward",
}


def tensor_bytes(tree) -> int:
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor))


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.bytes: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        out = func(*args, **(kwargs or {}))
        self.counts[name] += 1
        if name not in VIEWS:
            self.bytes[name] += tensor_bytes((args, kwargs, out))
        return out


@dataclasses.dataclass
class StepCount:
    counts: collections.Counter
    bytes: collections.Counter

    @property
    def kernels(self) -> int:
        return sum(n for name, n in self.counts.items() if name not in VIEWS)

    def traffic(self, matrix: bool) -> float:
        """MB moved by the matrix operations (matrix=True) or by all the others."""
        return sum(b for name, b in self.bytes.items() if (name in MATRIX) == matrix) / 1e6


def cuda_like_dropout(module: torch.nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """nn.Dropout as CUDA runs it: one native_dropout (the fused MeanFlow step calls it anyway)."""
    return torch.native_dropout(x, module.p, module.training)[0]


def count_step(
    model: FlowModel, loss_fn: Loss, x: torch.Tensor, y: torch.Tensor | None, precision: str
) -> StepCount:
    draws = loss_fn.draw(model, x, y, torch.Generator().manual_seed(0))
    with unittest.mock.patch.object(torch.nn.Dropout, "forward", cuda_like_dropout), OpCounter() as counter:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss, _ = loss_fn.evaluate(model, x, draws)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return StepCount(counter.counts, counter.bytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cifar10")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--jvp-precision", choices=["fp32", "tf32", "bf16"], default="tf32")
    parser.add_argument("--mode", default="fused", help="the MeanFlow JVP mode counted")
    parser.add_argument("--ratios", default="0.25,1.0")
    parser.add_argument("--top", type=int, default=15, help="operations listed for the first ratio's extra")
    parser.add_argument(
        "overrides", nargs="*", help="config overrides, e.g. model.channels=32 (a narrow model counts faster)"
    )
    args = parser.parse_args()

    cfg = load_config(args.preset, [f"loss.jvp_precision={args.jvp_precision}", *args.overrides])
    data_shape, num_classes = data_signature(cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg.model, data_shape, num_classes).train()
    batch = synthetic_batch(model, args.batch_size, torch.device("cpu"), cfg.loss)
    fm = count_step(model, flow_matching_loss(cfg.loss), batch.x, batch.y, args.precision)
    print(f"{args.preset}, batch {args.batch_size}, {args.precision}, JVP precision {args.jvp_precision}")
    print(f"{'case':16s} {'ops':>6s} {'non-view':>9s} {'MB other':>9s} {'MB matrix':>10s}")

    def row(case: str, step: StepCount) -> None:
        print(
            f"{case:16s} {sum(step.counts.values()):6d} {step.kernels:9d} "
            f"{step.traffic(False):9.1f} {step.traffic(True):10.1f}"
        )

    row("FM step", fm)
    extras = []
    for ratio in (float(r) for r in args.ratios.split(",")):
        step = count_step(model, meanflow_loss(cfg.loss, args.mode, ratio), batch.x, batch.y, args.precision)
        row(f"{args.mode} @{ratio:g}", step)
        extras.append(step)
    first = extras[0]
    added = first.counts - fm.counts
    added_bytes = first.bytes - fm.bytes
    print("non-view operations the first ratio adds to the FM step, by MB moved (count):")
    for name, mb in sorted(((k, v / 1e6) for k, v in added_bytes.items()), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {name:36s} {mb:9.1f} MB {added[name]:6d}")


if __name__ == "__main__":
    main()
