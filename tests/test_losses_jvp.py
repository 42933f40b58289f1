"""Every JVP strategy against the reference "nograd" mode, gradients through torch.func.jvp's
primal output, precision islands, and the CUDA-only strategy's guards."""

import math
import time

import pytest
import torch
from torch import Tensor, nn

from zoo.config.schema import DiTConfig, LossConfig
from zoo.devices import cuda_fp32_precision
from zoo.losses import MeanFlowLoss, build_jvp
from zoo.losses.jvp import CompileJvp, CudaGraphJvp, jvp_with_primal
from zoo.losses.time_sampling import sample_t_r
from zoo.models import build_model
from zoo.models.base import FlowModel

F64 = torch.float64
CUDA = torch.cuda.is_available()
NO_CUDA = "needs a CUDA device (CUDA graphs); none on this machine"


class DropoutMLP(FlowModel):
    def __init__(
        self, data_shape: tuple[int, ...] = (2,), hidden: int = 32, num_classes: int = 0, p: float = 0.3
    ):
        super().__init__(data_shape, num_classes)
        dim = math.prod(data_shape)
        self.inp = nn.Linear(dim + 2, hidden)
        if num_classes:
            self.embed = nn.Embedding(num_classes + 1, hidden)
        self.body = nn.Sequential(
            nn.SiLU(),
            nn.Dropout(p),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Dropout(p),
            nn.Linear(hidden, dim),
        )

    def forward(self, z: Tensor, t: Tensor, r: Tensor, y: Tensor | None = None) -> Tensor:
        h = self.inp(torch.cat([z.flatten(1), t[:, None], (t - r)[:, None]], dim=1))
        if self.num_classes:
            h = h + self.embed(y)
        return self.body(h).view_as(z)


def gen(seed: int = 0, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def loss_and_grads(model: FlowModel, loss_fn: MeanFlowLoss, x: Tensor, y: Tensor | None, seed: int):
    model.zero_grad()
    out = loss_fn(model, x, y, gen(seed, x.device.type))
    out.loss.backward()
    return out.loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_backprop_through_jvp_primal_equals_plain_forward_with_dropout() -> None:
    # Train mode, dropout active: the same RNG state gives the same masks in both forwards.
    torch.manual_seed(0)
    model = DropoutMLP(data_shape=(3, 2)).double().train()
    z, v = torch.randn(16, 3, 2, dtype=F64), torch.randn(16, 3, 2, dtype=F64)
    t = torch.rand(16, dtype=F64)
    r = t * torch.rand(16, dtype=F64)
    weights = torch.randn(16, 3, 2, dtype=F64)

    torch.manual_seed(123)
    u_jvp, _ = jvp_with_primal(model, z, t, r, None, v, "fp32")
    (u_jvp * weights).sum().backward()
    grads_jvp = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.manual_seed(123)
    u_plain = model(z, t, r)
    (u_plain * weights).sum().backward()
    grads_plain = [p.grad.clone() for p in model.parameters()]

    torch.testing.assert_close(u_jvp, u_plain, rtol=0, atol=0)
    for a, b in zip(grads_jvp, grads_plain, strict=True):
        torch.testing.assert_close(a, b)
    assert all(g.abs().sum() > 0 for g in grads_plain)


MODES = ["full_batch", "primal", "selective", "compile"]


@pytest.mark.parametrize("ratio", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("conditional", [False, True])
def test_every_mode_matches_nograd_reference(mode: str, ratio: float, conditional: bool) -> None:
    torch.manual_seed(1)
    num_classes = 4 if conditional else 0
    model = (
        DropoutMLP(data_shape=(2, 3), num_classes=num_classes).double().eval()
    )  # dropout off: modes comparable
    x = torch.randn(8, 2, 3, dtype=F64)
    y = torch.randint(0, num_classes, (8,)) if conditional else None
    # Conditional: label dropout and training-time guidance (omega, kappa, interval) on as well.
    extra = {"guidance_omega": 0.5, "guidance_kappa": 0.3, "guidance_t_max": 0.8} if conditional else {}
    base = LossConfig(ratio=ratio, class_dropout=0.25, weight_p=0.75, **extra)
    reference = MeanFlowLoss(base.model_copy(update={"jvp": "nograd"}))
    candidate = MeanFlowLoss(base.model_copy(update={"jvp": mode if mode != "compile" else "nograd"}))
    if mode == "compile":
        # aot_eager exercises dynamo's capture of torch.func.jvp in a second; inductor is tested below.
        candidate.jvp = CompileJvp("fp32", backend="aot_eager")
        torch._dynamo.reset()
    loss_ref, grads_ref = loss_and_grads(model, reference, x, y, seed=5)
    loss, grads = loss_and_grads(model, candidate, x, y, seed=5)
    if mode == "compile":
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    torch.testing.assert_close(loss, loss_ref)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", ["nograd", "full_batch", "primal", "selective"])
def test_jvp_is_fp32_and_matches_reference_under_bf16_autocast(mode: str) -> None:
    torch.manual_seed(2)
    model = DropoutMLP(data_shape=(4,)).eval()
    x = torch.randn(32, 4)
    loss_fn = MeanFlowLoss(LossConfig(jvp=mode, ratio=0.5))
    ref = loss_fn.terms(model, x, None, gen(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = loss_fn.terms(model, x, None, gen(3))
    assert terms.dudt.dtype == torch.float32
    assert terms.u.dtype == torch.float32 and terms.loss.dtype == torch.float32
    m = terms.times.mask
    # fp32 island: the JVP is exactly the fp32 one even though the caller is under bf16 autocast.
    torch.testing.assert_close(terms.dudt[m], ref.dudt[m], rtol=1e-6, atol=1e-6)
    # The grad forward follows the caller's bf16 autocast where the mode uses one (bf16-size error).
    torch.testing.assert_close(terms.u, ref.u, rtol=0.05, atol=0.05)


def test_full_batch_under_bf16_autocast_trains_as_fp32_does() -> None:
    """Why full_batch is no bf16 training mode: its prediction is the JVP's primal output, computed in
    the fp32 island, so under bf16 autocast its loss is fp32's to the bit; selective's prediction
    follows the autocast (bf16-size difference)."""
    torch.manual_seed(2)
    model = DropoutMLP(data_shape=(4,)).eval()
    x = torch.randn(32, 4)
    losses = {}
    for mode, autocast in (("full_batch", False), ("full_batch", True), ("selective", True)):
        loss_fn = MeanFlowLoss(LossConfig(jvp=mode, ratio=0.5))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            losses[mode, autocast] = loss_fn.terms(model, x, None, gen(3)).loss
    fp32 = losses["full_batch", False]
    assert torch.equal(losses["full_batch", True], fp32)
    assert not torch.equal(losses["selective", True], fp32)
    torch.testing.assert_close(losses["selective", True], fp32, rtol=0.05, atol=0.0)


def test_bf16_jvp_precision_runs_under_autocast_and_stays_close() -> None:
    torch.manual_seed(3)
    model = DropoutMLP(data_shape=(4,)).eval()
    z, v = torch.randn(64, 4), torch.randn(64, 4)
    t = torch.rand(64)
    r = t * 0.5
    u32, d32 = jvp_with_primal(model, z, t, r, None, v, "fp32")
    u16, d16 = jvp_with_primal(model, z, t, r, None, v, "bf16")
    assert d16.dtype == torch.float32  # upcast on the way out
    assert u16.dtype == torch.bfloat16  # the island really ran in bf16
    assert not torch.equal(d16, d32)
    torch.testing.assert_close(d16, d32, rtol=0.1, atol=0.05)


def test_cuda_graph_mode_refuses_cpu_with_a_clear_error() -> None:
    model = DropoutMLP()
    loss_fn = MeanFlowLoss(LossConfig(jvp="cuda_graph"))
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        loss_fn(model, torch.randn(4, 2), None, gen())


def test_fused_mode_refuses_a_network_that_cannot_run_on_duals() -> None:
    loss_fn = MeanFlowLoss(LossConfig(jvp="fused", ratio=1.0))
    with pytest.raises(ValueError, match="DropoutMLP is not one: use jvp='nograd'"):
        loss_fn(DropoutMLP(), torch.randn(4, 2), None, gen())


def test_auto_must_be_resolved_and_bad_modes_are_refused() -> None:
    with pytest.raises(ValueError, match="plan_run"):
        build_jvp("auto")
    with pytest.raises(ValueError, match="unknown jvp mode"):
        build_jvp("sideways")
    with pytest.raises(ValueError, match="jvp_precision"):
        build_jvp("nograd", "fp8")


@pytest.mark.slow
def test_compile_mode_with_inductor_matches_reference() -> None:
    """Real inductor compile on CPU; skipped when the compile alone exceeds 60 s here."""
    torch.manual_seed(4)
    model = DropoutMLP(data_shape=(2,)).eval()
    x = torch.randn(8, 2)
    cfg = LossConfig(ratio=0.5)
    strategy = CompileJvp("fp32", backend="inductor")
    torch._dynamo.reset()
    times = sample_t_r(8, cfg, gen())
    z, v = x, torch.randn(8, 2)
    start = time.perf_counter()
    u, dudt = strategy(model, z, times.t, times.r, None, v, times)
    elapsed = time.perf_counter() - start
    if elapsed > 60:
        pytest.skip(f"inductor compile took {elapsed:.0f} s on this machine (> 60 s budget)")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    _, ref = jvp_with_primal(model, z, times.t, times.r, None, v, "fp32")
    torch.testing.assert_close(dudt, ref)
    torch.testing.assert_close(u, model(z, times.t, times.r))


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_cuda_graph_matches_nograd_and_tracks_weights(precision: str) -> None:
    torch.manual_seed(5)
    dev = torch.device("cuda")
    model = DropoutMLP(data_shape=(2, 3), num_classes=3).to(dev).eval()
    x, y = torch.randn(16, 2, 3, device=dev), torch.randint(0, 3, (16,), device=dev)
    base = LossConfig(ratio=0.25, jvp_precision=precision)
    reference = MeanFlowLoss(base.model_copy(update={"jvp": "nograd"}))
    graphed = MeanFlowLoss(base.model_copy(update={"jvp": "cuda_graph"}))
    strategy = graphed.jvp
    assert isinstance(strategy, CudaGraphJvp)
    tol = {"rtol": 1e-5, "atol": 1e-6} if precision == "fp32" else {"rtol": 5e-3, "atol": 5e-3}

    def compare() -> None:
        loss_ref, grads_ref = loss_and_grads(model, reference, x, y, seed=6)
        loss, grads = loss_and_grads(model, graphed, x, y, seed=6)
        torch.testing.assert_close(loss, loss_ref, **tol)
        for a, b in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(a, b, **tol)

    compare()
    assert strategy.captures == 1
    # In-place optimiser updates are seen by the graph without recapture (no stale weights).
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt.step()
    compare()
    assert strategy.captures == 1
    # A replaced parameter tensor forces a recapture instead of a stale read.
    model.inp.weight = nn.Parameter(torch.randn_like(model.inp.weight))
    compare()
    assert strategy.captures == 2
    # New shapes recapture too.
    x, y = torch.randn(24, 2, 3, device=dev), torch.randint(0, 3, (24,), device=dev)
    compare()
    assert strategy.captures == 3


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_cuda_graph_is_fp32_under_bf16_autocast() -> None:
    torch.manual_seed(6)
    dev = torch.device("cuda")
    model = DropoutMLP(data_shape=(4,)).to(dev).eval()
    x = torch.randn(32, 4, device=dev)
    ref = MeanFlowLoss(LossConfig(jvp="nograd", ratio=1.0)).terms(model, x, None, gen(7, "cuda"))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        terms = MeanFlowLoss(LossConfig(jvp="cuda_graph", ratio=1.0)).terms(model, x, None, gen(7, "cuda"))
    assert terms.dudt.dtype == torch.float32
    torch.testing.assert_close(terms.dudt, ref.dudt, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device; none on this machine")
@pytest.mark.parametrize("mode", ["full_batch", "primal", "selective"])
def test_modes_match_reference_on_cuda(mode: str) -> None:
    torch.manual_seed(7)
    dev = torch.device("cuda")
    model = DropoutMLP(data_shape=(2, 3)).to(dev).eval()
    x = torch.randn(16, 2, 3, device=dev)
    # IEEE fp32 everywhere: the modes compute u inside or outside the JVP island, and TF32 (cuDNN's
    # default for convolutions) would differ between the two by ~1e-3 relative.
    base = LossConfig(ratio=0.25, jvp_precision="fp32")
    with cuda_fp32_precision("ieee"):
        loss_ref, grads_ref = loss_and_grads(
            model, MeanFlowLoss(base.model_copy(update={"jvp": "nograd"})), x, None, 8
        )
        loss, grads = loss_and_grads(model, MeanFlowLoss(base.model_copy(update={"jvp": mode})), x, None, 8)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_jvp_with_primal_returns_a_detached_tangent() -> None:
    """Layers compute their tangents unrecorded inside it: a graph on du/dt would be incomplete."""
    model = build_model(DiTConfig(patch_size=2, hidden=16, depth=1, heads=2), (1, 4, 4), 0)
    z = torch.randn(2, 1, 4, 4)
    t = torch.rand(2)
    u, dudt = jvp_with_primal(model, z, t, t * 0.5, None, torch.randn_like(z), "fp32")
    assert u.requires_grad and not dudt.requires_grad


@pytest.fixture
def restore_fp32_precision():
    backends = torch.backends
    saved = (
        torch.get_float32_matmul_precision(),
        backends.cudnn.conv.fp32_precision,
        backends.cudnn.benchmark,
        backends.mkldnn.matmul.fp32_precision,
    )
    yield
    torch.set_float32_matmul_precision(saved[0])
    backends.cudnn.conv.fp32_precision, backends.cudnn.benchmark = saved[1], saved[2]
    backends.mkldnn.matmul.fp32_precision = saved[3]


def test_zoo_tf32_settings_keep_the_precision_getter_working_and_the_cpu_in_ieee(
    restore_fp32_precision,
) -> None:
    """The flags are process-wide and settable without a GPU.  Inductor's kernel tuning reads
    torch.get_float32_matmul_precision(), the JVP's island the per-backend flags: both must work,
    before and after the island.  (Inside it the legacy allow_tf32 getters raise, "mix of the
    legacy and new APIs"; of torch's own code only TunableOp reads them, which zoo never enables.)
    The CPU's oneDNN matmuls stay IEEE fp32."""
    from zoo.devices import enable_cuda_tf32

    enable_cuda_tf32()
    assert torch.get_float32_matmul_precision() == "high"  # raised with the per-backend flags alone
    assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"  # "high" had set it to tf32
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == (
        "tf32",
        "tf32",
    )
    with cuda_fp32_precision("ieee"):
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == (
            "ieee",
            "ieee",
        )
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == (
        "tf32",
        "tf32",
    )
    assert torch.get_float32_matmul_precision() == "high"
