"""The fused JVP (zoo.models.dual): one forward over the batch carrying du/dt of a few rows.

Checked against independent truths: central differences of the network (float64), the plain
forward's output and gradients (bitwise), torch.func.jvp, the nograd reference loss, and the
memory of a flow-matching step.
"""

import pytest
import torch
import torch.nn.functional as F
from model_helpers import perturb

from zoo.config.schema import DiTConfig, LossConfig, MLPConfig, UNetConfig
from zoo.devices import cuda_fp32_precision
from zoo.losses import MeanFlowLoss, build_jvp, build_loss
from zoo.losses.jvp import tangent_island
from zoo.losses.time_sampling import sample_t_r
from zoo.models import build_model
from zoo.models import dual as D
from zoo.models.base import FlowModel
from zoo.models.layers import GELU, Attention, Conv2d, Dropout, GroupNorm, LayerNorm, Linear, SiLU
from zoo.training.memory import LiveTensors

F64 = torch.float64
CPU = torch.device("cpu")

CASES = {
    "mlp": ((2,), MLPConfig(hidden=32, depth=2, time_embed_dim=16), 0),
    "unet-attention": (
        (1, 8, 8),
        UNetConfig(
            channels=16, channel_mults=[1, 2], blocks_per_res=1, attention_res=[8, 4], num_groups=8, heads=2
        ),
        3,
    ),
    "unet-odd-size": (
        (3, 12, 12),
        UNetConfig(channels=16, channel_mults=[1, 2, 2], blocks_per_res=1, attention_res=[3], num_groups=4),
        0,
    ),
    "dit": ((2, 8, 8), DiTConfig(patch_size=2, hidden=32, depth=2, heads=4), 3),
}


def perturbed(cfg, shape, num_classes, dtype=F64, seed=0):
    """A model moved off its zero initialisation, so every path carries signal."""
    torch.manual_seed(seed)
    return perturb(build_model(cfg, shape, num_classes).to(dtype).eval(), seed=seed + 1)


def island():
    return tangent_island("fp32", CPU)


@pytest.mark.parametrize("name", list(CASES))
def test_row_tangents_match_central_differences_and_output_is_the_plain_forward(name):
    shape, cfg, num_classes = CASES[name]
    model = perturbed(cfg, shape, num_classes)
    batch = 5
    g = torch.Generator().manual_seed(2)
    z = torch.randn(batch, *shape, generator=g, dtype=F64)
    v = torch.randn(batch, *shape, generator=g, dtype=F64)
    t = torch.tensor([0.9, 0.6, 0.35, 0.5, 0.8], dtype=F64)
    r = torch.tensor([0.1, 0.6, 0.2, 0.0, 0.75], dtype=F64)
    y = torch.tensor([0, 2, 1, 3, 1]) if num_classes else None
    rows = torch.tensor([4, 0, 2])  # any order, not contiguous

    u, du_rows = model.forward_with_row_tangents(z, t, r, y, rows, v[rows], island)

    torch.testing.assert_close(u, model(z, t, r, y), rtol=0, atol=0)
    eps = 1e-6
    fd = (model(z + eps * v, t + eps, r, y) - model(z - eps * v, t - eps, r, y)) / (2 * eps)
    scale = fd[rows].abs().max().item()
    assert scale > 1e-3  # not trivially zero
    assert du_rows.shape == (3, *shape)
    assert (du_rows - fd[rows]).abs().max().item() < 1e-6 * scale


@pytest.mark.parametrize("name", ["unet-attention", "dit"])
def test_gradients_through_the_fused_output_equal_the_plain_forward(name):
    shape, cfg, num_classes = CASES[name]
    model = perturbed(cfg, shape, num_classes)
    z = torch.randn(4, *shape, dtype=F64)
    t, r = torch.rand(4, dtype=F64), torch.zeros(4, dtype=F64)
    y = torch.tensor([0, 1, 2, 0]) if num_classes else None
    weights = torch.randn_like(z)

    (model(z, t, r, y) * weights).sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    u, _ = model.forward_with_row_tangents(
        z, t, r, y, torch.tensor([1, 3]), torch.randn(2, *shape, dtype=F64), island
    )
    (u * weights).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], rtol=0, atol=0, msg=n)


LOSS_CASES = [
    ("mlp", 0.0, False),
    ("mlp", 0.25, False),
    ("mlp", 1.0, False),
    ("mlp", 0.25, True),
    ("mlp", 1.0, True),
    ("unet-attention", 0.5, True),
    ("unet-odd-size", 0.25, False),
    ("dit", 0.5, True),
]


@pytest.mark.parametrize("name,ratio,conditional", LOSS_CASES)
def test_fused_loss_and_gradients_match_the_nograd_reference(name, ratio, conditional):
    shape, cfg, _ = CASES[name]
    num_classes = 3 if conditional else 0
    model = perturbed(cfg, shape, num_classes)
    x = torch.randn(8, *shape, dtype=F64)
    y = torch.randint(0, num_classes, (8,)) if conditional else None
    # Conditional: label dropout and training-time guidance (omega, kappa, interval) on as well.
    extra = {"guidance_omega": 0.5, "guidance_kappa": 0.3, "guidance_t_max": 0.8} if conditional else {}
    base = LossConfig(ratio=ratio, class_dropout=0.25, weight_p=0.75, **extra)
    results = []
    for mode in ("nograd", "fused"):
        model.zero_grad()
        out = MeanFlowLoss(base.model_copy(update={"jvp": mode}))(
            model, x, y, torch.Generator().manual_seed(5)
        )
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_ref, grads_ref), (loss, grads) = results
    torch.testing.assert_close(loss, loss_ref)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b)


def test_fused_under_bf16_autocast_has_a_bf16_size_tangent_error_in_fp32():
    shape, cfg, num_classes = CASES["unet-attention"]
    model = perturbed(cfg, shape, num_classes, dtype=torch.float32)
    x = torch.randn(8, *shape)
    y = torch.randint(0, 3, (8,))
    loss_fn = MeanFlowLoss(LossConfig(jvp="fused", ratio=0.5))
    ref = loss_fn.terms(model, x, y, torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = loss_fn.terms(model, x, y, torch.Generator().manual_seed(3))
    m = terms.times.mask
    assert terms.dudt.dtype == torch.float32
    # The tangent is computed in fp32 but at the bf16 forward's activations: bf16-size error
    # (the run's "JVP mode:" line says so, zoo.training.jvp_plan.fused_precision_note).
    error = (terms.dudt[m] - ref.dudt[m]).norm() / ref.dudt[m].norm()
    assert 1e-4 < error < 0.05


def test_fused_with_a_bf16_jvp_returns_fp32_du_dt_close_to_fp32():
    shape, cfg, num_classes = CASES["dit"]
    model = perturbed(cfg, shape, num_classes, dtype=torch.float32)
    x, y = torch.randn(8, *shape), torch.randint(0, 3, (8,))
    ref = MeanFlowLoss(LossConfig(jvp="fused", ratio=0.5)).terms(
        model, x, y, torch.Generator().manual_seed(3)
    )
    loss_fn = MeanFlowLoss(LossConfig(jvp="fused", ratio=0.5, jvp_precision="bf16"))
    terms = loss_fn.terms(model, x, y, torch.Generator().manual_seed(3))
    m = terms.times.mask
    assert terms.dudt.dtype == torch.float32
    error = (terms.dudt[m] - ref.dudt[m]).norm() / ref.dudt[m].norm()
    assert 1e-4 < error < 0.05  # the tangent really ran in bf16, and stayed close


def test_no_rows_gives_the_plain_forward_and_an_empty_tangent():
    shape, cfg, _ = CASES["unet-odd-size"]
    model = perturbed(cfg, shape, 0)
    z, t = torch.randn(3, *shape, dtype=F64), torch.rand(3, dtype=F64)
    rows = torch.zeros(0, dtype=torch.long)
    u, du = model.forward_with_row_tangents(z, t, t, None, rows, torch.zeros(0, *shape, dtype=F64), island)
    torch.testing.assert_close(u, model(z, t, t), rtol=0, atol=0)
    assert du.shape == (0, *shape)


def test_a_broadcast_factor_is_not_mistaken_for_per_sample_when_its_size_equals_the_batch():
    """A (C, 1, 1) scale with C == B must multiply every row's tangent whole."""
    batch = channels = 4
    x, dx = torch.randn(batch, channels, 3, 3, dtype=F64), torch.randn(batch, channels, 3, 3, dtype=F64)
    gamma = torch.randn(channels, 1, 1, dtype=F64)
    rows = torch.tensor([2, 0])
    meta = D.RowTangents(rows=rows, batch=batch, island=island)
    out = D.Dual(x, dx[rows], meta) * gamma
    _, expected = torch.func.jvp(lambda a: a * gamma, (x,), (dx,))
    torch.testing.assert_close(out.tangent, expected[rows])


@pytest.mark.parametrize("dtype", [F64, torch.bfloat16])
def test_dropout_tangent_uses_the_primal_mask(dtype):
    module = Dropout(0.4).train()
    x = torch.rand(6, 50, dtype=F64) + 0.5  # nonzero: output / input reveals mask / (1 - p)
    rows = torch.tensor([5, 1])
    dx = torch.randn(2, 50, dtype=F64)
    meta = D.RowTangents(rows=rows, batch=6, island=island)
    out = module(D.Dual(x, dx.to(dtype), meta))
    factor = out.primal[rows] / x[rows]
    kept = factor != 0
    assert kept.any() and (~kept).any()
    torch.testing.assert_close(factor[kept], torch.full_like(factor[kept], 1 / 0.6))
    assert out.tangent.dtype == dtype
    # In bf16 too the scale is applied unrounded and the product rounded once (torch's own
    # forward-AD rule): exactly dx * (1 / 0.6) rounded to the tangent's dtype, zero where dropped.
    expected = torch.where(kept, (dx.to(dtype).double() / 0.6).to(dtype), torch.zeros((), dtype=dtype))
    torch.testing.assert_close(out.tangent, expected, rtol=1e-14 if dtype == F64 else 0, atol=0)


def test_dropout_of_one_drops_the_tangent_too():
    meta = D.RowTangents(rows=torch.tensor([0]), batch=2, island=island)
    out = Dropout(1.0).train()(D.Dual(torch.ones(2, 5), torch.ones(1, 5), meta))
    assert torch.equal(out.primal, torch.zeros(2, 5)) and torch.equal(out.tangent, torch.zeros(1, 5))


def test_product_rule_matches_torch_func_jvp():
    a, b = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    da, db = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    rows = torch.tensor([3, 0])
    meta = D.RowTangents(rows=rows, batch=4, island=island)

    def f(a_, b_):
        return a_ * torch.sigmoid(b_) + 2.0

    out = D.Dual(a, da[rows], meta) * _sigmoid(D.Dual(b, db[rows], meta)) + 2.0
    _, expected = torch.func.jvp(f, (a, b), (da, db))
    torch.testing.assert_close(out.primal, f(a, b))
    torch.testing.assert_close(out.tangent, expected[rows])


def _sigmoid(x: D.Dual) -> D.Dual:
    """sigmoid through Dual.elementwise: derivative s (1 - s)."""
    return x.elementwise(torch.sigmoid, lambda dx, rows: dx * torch.sigmoid(rows) * (1 - torch.sigmoid(rows)))


def test_fused_step_needs_no_more_memory_than_flow_matching():
    """The tangent is computed without autograd: the step's peak stays that of an FM step."""
    shape, cfg, _ = CASES["unet-odd-size"]
    model = build_model(cfg.model_copy(update={"dropout": 0.1}), shape, 0).train()
    x = torch.randn(16, *shape)
    peaks = {}
    for name, loss_cfg in {
        "fm": LossConfig(kind="flow_matching"),
        "fused": LossConfig(jvp="fused", ratio=0.75),
        "full_batch": LossConfig(jvp="full_batch", ratio=0.75),
    }.items():
        loss_fn = build_loss(loss_cfg)
        with LiveTensors() as live:
            loss_fn(model, x, None, torch.Generator().manual_seed(0)).loss.backward()
        model.zero_grad(set_to_none=True)
        peaks[name] = live.peak_bytes
    assert peaks["fused"] <= 1.1 * peaks["fm"], peaks
    # Guard: the meter sees what a JVP recording its primal and built-in tangent ops costs.
    assert peaks["full_batch"] > 1.1 * peaks["fused"], peaks


class PlainModel(FlowModel):
    def forward(self, z, t, r, y=None):
        return z * t[:, None]


def test_fused_mode_refuses_a_model_without_row_tangents():
    times = sample_t_r(4, LossConfig(ratio=0.5), torch.Generator().manual_seed(0))
    z = torch.randn(4, 2)
    with pytest.raises(ValueError, match="jvp='nograd'"):
        build_jvp("fused")(PlainModel((2,)), z, times.t, times.r, None, z, times)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none on this machine")
def test_fused_matches_nograd_on_cuda():
    shape, cfg, num_classes = CASES["unet-attention"]
    model = perturbed(cfg, shape, num_classes, dtype=torch.float32).cuda()
    x, y = torch.randn(16, *shape, device="cuda"), torch.randint(0, 3, (16,), device="cuda")
    results = []
    for mode in ("nograd", "fused"):
        model.zero_grad()
        loss_fn = MeanFlowLoss(LossConfig(jvp=mode, ratio=0.25, jvp_precision="fp32"))
        # IEEE fp32 outside the island too (cuDNN convolutions default to TF32): fused takes its
        # tangent at the outside forward's activations, nograd at the island's.
        with cuda_fp32_precision("ieee"):
            out = loss_fn(model, x, y, torch.Generator(device="cuda").manual_seed(8))
            out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_ref, grads_ref), (loss, grads) = results
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "rows", [slice(0, 3), slice(0, 0), slice(2, None), slice(None, 9), slice(0, 20), slice(5, 2)]
)
def test_row_count_of_a_slice_is_what_indexing_selects(rows):
    # Arithmetic, not slice.indices (which torch.compile may not trace): checked against indexing.
    assert D.row_count(rows, 9) == torch.arange(9)[rows].shape[0]
    assert D.row_count(torch.tensor([4, 1]), 9) == 2
    with pytest.raises(ValueError, match="forward"):
        D.row_count(slice(0, 4, 2), 9)


# ----------------------------------------------------------------------------- Dual's Tensor interface

BATCH, ROWS = 4, torch.tensor([3, 0])


def duals(*shape_and_tangents):
    """Inputs, their tangents for every row, and the Duals carrying the tangents of ROWS."""
    meta = D.RowTangents(rows=ROWS, batch=BATCH, island=island)
    return [D.Dual(x, dx[ROWS], meta) for x, dx in shape_and_tangents]


def check_against_jvp(f, *inputs):
    """f applied to Duals gives f's value and the rows of torch.func.jvp's tangent."""
    g = torch.Generator().manual_seed(0)
    tangents = [torch.randn(x.shape, generator=g, dtype=F64) for x in inputs]
    out = f(*duals(*zip(inputs, tangents, strict=True)))
    value, expected = torch.func.jvp(f, tuple(inputs), tuple(tangents))
    torch.testing.assert_close(out.primal, value, rtol=0, atol=0)
    assert out.tangent is not None and out.tangent.shape == (len(ROWS), *value.shape[1:])
    torch.testing.assert_close(out.tangent, expected[ROWS])


def _constant():
    return torch.randn(BATCH, 3, 5, generator=torch.Generator().manual_seed(9), dtype=F64)


ARITHMETIC = {
    "dual + tensor": lambda a, b: a + _constant(),
    "tensor + dual": lambda a, b: _constant() + a,
    "number + dual": lambda a, b: 1 + a,
    "dual - tensor": lambda a, b: a - _constant(),
    "tensor - dual": lambda a, b: _constant() - a,
    "number - dual": lambda a, b: 2.0 - a,
    "dual - dual": lambda a, b: a - b,
    "-dual": lambda a, b: -a,
    "tensor * dual": lambda a, b: _constant() * a,
    "dual * broadcast tensor": lambda a, b: a * torch.linspace(-1, 1, 5, dtype=F64),
    "number * dual": lambda a, b: 0.5 * a,
    "dual * dual": lambda a, b: a * b,
    "dual / tensor": lambda a, b: a / (2 + _constant().abs()),
    "tensor / dual": lambda a, b: _constant() / b,
    "number / dual": lambda a, b: 3.0 / b,
    "dual / dual": lambda a, b: a / b,
    "torch.mul(tensor, dual)": lambda a, b: torch.mul(_constant(), a),
    "torch.sub(tensor, dual)": lambda a, b: torch.sub(_constant(), b),
}


@pytest.mark.parametrize("name", list(ARITHMETIC))
def test_arithmetic_operators_follow_torch_func_jvp(name):
    a = torch.randn(BATCH, 3, 5, dtype=F64)
    b = 1.5 + torch.rand(BATCH, 3, 5, dtype=F64)  # away from zero: a divisor
    check_against_jvp(ARITHMETIC[name], a, b)


SHAPES = {
    "reshape": lambda x: x.reshape(x.shape[0], 2, 3, 4) * x.reshape((x.shape[0], 2, 3, 4)),
    "view": lambda x: x.view(x.shape[0], -1),
    "flatten": lambda x: x.flatten(2) * x.flatten(1, 2).reshape(x.shape[0], 2, 12),
    "transpose": lambda x: x.transpose(1, -1),
    "permute": lambda x: x.permute(0, 3, 1, 2) * x.permute((0, 3, 1, 2)),
    "unsqueeze": lambda x: x.unsqueeze(1) * x.unsqueeze(-4),
    "chunk": lambda x: x.chunk(2, dim=1)[1] * x.chunk(2, dim=1)[0],
    "unbind": lambda x: x.unbind(dim=3)[0] * x.unbind(3)[3],
    "torch.cat with a tensor": lambda x: torch.cat([torch.ones(BATCH, 1, 3, 4, dtype=F64), x, 2 * x], dim=1),
    "avg_pool2d": lambda x: F.avg_pool2d(x, kernel_size=2, stride=2, ceil_mode=True),
    "interpolate": lambda x: F.interpolate(x, size=(7, 5), mode="nearest"),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_shape_methods_cat_and_resampling_follow_torch_func_jvp(name):
    check_against_jvp(SHAPES[name], torch.randn(BATCH, 2, 3, 4, dtype=F64))


@pytest.mark.parametrize(
    "f",
    [
        lambda x: x.reshape(-1),
        lambda x: x.view(2, 2, 6),
        lambda x: x.flatten(),
        lambda x: x.transpose(0, 1),
        lambda x: x.permute(1, 0, 2),
        lambda x: x.unsqueeze(0),
        lambda x: x.chunk(2, dim=0),
        lambda x: x.unbind(-3),
        lambda x: torch.cat([x, x]),
    ],
)
def test_operations_that_would_move_the_batch_dimension_are_refused(f):
    (x,) = duals((torch.randn(BATCH, 3, 4), torch.randn(BATCH, 3, 4)))
    with pytest.raises(ValueError, match="batch"):
        f(x)


def test_a_torch_function_without_a_tangent_rule_is_an_error_naming_it():
    (x,) = duals((torch.randn(BATCH, 3), torch.randn(BATCH, 3)))
    with pytest.raises(TypeError, match="exp does not take zoo.models.dual.Dual"):
        torch.exp(x)


def test_a_tensor_on_the_left_traces_into_one_graph():
    """tensor * dual reaches the Dual through __torch_function__, which torch.compile follows
    (Python's reflected operators would put a non-Tensor into the graph: a graph break)."""
    torch._dynamo.reset()
    c = torch.rand(BATCH, 3, dtype=F64) + 1

    def f(a, da):
        x = D.Dual(a, da, D.RowTangents(rows=slice(0, 2), batch=BATCH, island=island))
        y = c * x + c - c / (x * x + 1.0)
        y = torch.cat([y, c], dim=1)
        return y.primal, y.tangent

    a, da = torch.randn(BATCH, 3, dtype=F64), torch.randn(2, 3, dtype=F64)
    compiled = torch.compile(f, backend="eager", fullgraph=True)  # a graph break raises
    for got, want in zip(compiled(a, da), f(a, da), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch._dynamo.reset()


LAYERS = {
    "linear": (lambda: Linear(6, 5), (6,)),
    "conv": (lambda: Conv2d(4, 6, 3, stride=2, padding=1), (4, 7, 7)),
    "group_norm": (lambda: GroupNorm(2, 4), (4, 5, 5)),
    "layer_norm": (lambda: LayerNorm(6), (3, 6)),
    "attention": (lambda: Attention(8, heads=2), (5, 8)),
    "silu": (SiLU, (3, 6)),
    "gelu": (GELU, (3, 6)),
    "gelu_tanh": (lambda: GELU(approximate="tanh"), (3, 6)),
    "dropout_eval": (lambda: Dropout(0.5).eval(), (3, 6)),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_each_layer_given_a_dual_is_the_plain_layer_with_the_rows_central_difference(name):
    make, shape = LAYERS[name]
    torch.manual_seed(0)
    layer = perturb(make().to(F64))
    x, dx = torch.randn(BATCH, *shape, dtype=F64), torch.randn(BATCH, *shape, dtype=F64)
    (dual,) = duals((x, dx))
    out = layer(dual)
    torch.testing.assert_close(out.primal, layer(x), rtol=0, atol=0)
    eps = 1e-6
    fd = (layer(x + eps * dx) - layer(x - eps * dx)) / (2 * eps)
    assert fd[ROWS].abs().max() > 1e-2
    torch.testing.assert_close(out.tangent, fd[ROWS], rtol=1e-6, atol=1e-8)
