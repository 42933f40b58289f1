"""Ways to compute the MeanFlow JVP: u(z, t, r) and the total derivative du/dt = (du/dz) v + du/dt|_z,
i.e. the JVP of u along the tangents (v, 1, 0) for (z, t, r).

Every strategy returns, for the whole batch in batch order,
    u     the prediction, with autograd graph to the parameters (what the loss trains);
    dudt  the total derivative, detached, in fp32 (or the batch's dtype when wider).  Where r = t
          it is zero for the selective strategies (no JVP is computed there) and the real
          derivative for nograd / full_batch; either is harmless, since the target multiplies it
          by t - r = 0.

Tangents are (v, 1, 0) for (z, t, r) since zoo calls models as model(z, t, r, y); the paper's
(v, 0, 1) is for its (z, r, t) order.  Parameters get no tangent: torch.func.jvp treats the
module's closed-over parameters as constants of the forward-mode level, while reverse-mode
autograd still records the primal computation, so backpropagating through the primal output of
torch.func.jvp gives the same parameter gradients as a plain forward (tested).

Cost in forward-equivalents F (a backward ~ 2F; a forward-mode JVP ~ 2F, primal + tangent,
since the tangent of W @ h is one more matmul W @ dh and parameters carry no tangent), with
k = ratio * B samples having r != t:
    nograd      no-grad JVP(B) + grad forward(B) + backward         ~ 2 + 1 + 2       = 5F
    full_batch  JVP(B) with grad, primal reused + backward          ~ 2 + 2           = 4F
    primal      JVP(k) with grad + grad forward(B-k) + backward      ~ 2k/B + (1-k/B) + 2 = (3 + k/B)F
    fused       grad forward(B) carrying the tangent of the k rows   ~ 1 + k/B + 2     = (3 + k/B)F
                + backward (zoo.models.dual; needs a RowTangentModel, as zoo's networks are)
    selective   no-grad JVP(k) + grad forward(B) + backward         ~ 2k/B + 1 + 2    = (3 + 2k/B)F
    compile     nograd with the JVP compiled (same flops, fused kernels)
    cuda_graph  nograd with the JVP replayed from a CUDA graph (same flops, no launch overhead)
primal and fused do the same flops; fused runs them as flow matching does (one forward and one
backward over the whole batch, at full-batch kernel efficiency) instead of splitting the batch
into two passes, and computes the tangent without autograd (memory ~ an FM step's).
The grad-recording JVPs (full_batch, primal) record the built-in ops' tangents with autograd
(zoo's own layers compute theirs unrecorded, zoo.models.layers.detached_tangents), so their peak
activation memory is higher than a forward's.  On small models launch overhead, not flops,
dominates; measure.

Dropout: primal-reusing modes (full_batch, primal, fused) use ONE dropout mask for u and du/dt, as a
single JVP call with primal reuse does; nograd/selective/compile/cuda_graph run two forwards, so
the target's du/dt sees a different mask than the prediction.  The modes therefore differ in
train mode with active dropout; without dropout (or in eval mode) they agree (tested).

Precision: the JVP runs in fp32 with autocast disabled inside and reduced-precision inputs
upcast, even when the caller is under bf16/fp16 autocast.  jvp_precision = "tf32" (the config's
default: on CUDA the tangent is most of MeanFlow's extra work, and tensor cores run TF32 at a
multiple of IEEE fp32's rate for ~1e-3 relative error) allows TF32 matmuls/convolutions inside;
"fp32" forces IEEE fp32 on CUDA too; on CPU both are plain fp32.  "bf16" runs the JVP under bf16
autocast.  Forwards outside the JVP follow the caller's autocast.  Note that modes reusing the
primal compute the prediction u itself inside this island (full_batch: every row; primal: the
r != t rows), where the run's --precision does not reach it: under bf16 autocast full_batch
trains exactly as fp32 does.  fused computes only the tangent there, at the activations of the
caller's autocast.

Which modes a run may use, and with which other settings, is zoo.training.jvp_plan's to say:
`zoo train` runs fused (the default) and nograd (the reference); the others are the benchmark's.
"""

import functools
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from zoo import cuda_graphs
from zoo.devices import cuda_fp32_precision
from zoo.losses.time_sampling import TimePair
from zoo.models import group_norm_tangent_kernel
from zoo.models.base import FlowModel, RowTangentModel
from zoo.models.dual import upcast
from zoo.models.embeddings import GuidanceInputs
from zoo.models.layers import detached_tangents

JVP_MODES = ("full_batch", "primal", "fused", "selective", "nograd", "compile", "cuda_graph")
JVP_PRECISIONS = ("fp32", "tf32", "bf16")


def load_forward_ad_decompositions() -> None:
    """Load torch's forward-AD decompositions now, without the warning they raise.

    torch loads them on a process's first JVP and builds them with torch.jit.script, which torch
    2.14 itself marks deprecated: every MeanFlow run would print a FutureWarning about torch's
    internals.  Loading them here (0.1–0.3 s) with that one warning ignored keeps runs' output clean.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning
        )
        import torch._decomp.decompositions_for_jvp  # noqa: F401


load_forward_ad_decompositions()


@contextmanager
def jvp_precision(precision: str, device: torch.device) -> Iterator[None]:
    """The numeric island the JVP runs in (see the module docstring)."""
    if precision == "bf16":
        # cache_enabled=False: autocast's weight-cast cache must not outlive a CUDA graph capture.
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):
            yield
        return
    if precision not in ("fp32", "tf32"):
        raise ValueError(f"unknown jvp_precision {precision!r}; use one of {JVP_PRECISIONS}")
    with torch.autocast(device.type, enabled=False):
        # Inside a compiled step (train.compile) the flags cannot be switched for part of the
        # graph: its matmuls and convolutions follow the process-wide flags in effect when it
        # runs (TF32 in zoo's training and benchmarks; compiled_step refuses IEEE fp32 there).
        if device.type == "cuda" and not torch.compiler.is_compiling():
            with cuda_fp32_precision("tf32" if precision == "tf32" else "ieee"):
                yield
        else:
            yield


def select(y: Tensor | None, index: Tensor) -> Tensor | None:
    return None if y is None else y[index]


def model_jvp(
    model: FlowModel,
    z: Tensor,
    t: Tensor,
    r: Tensor,
    y: Tensor | None,
    v: Tensor,
    guidance: GuidanceInputs | None = None,
) -> tuple[Tensor, Tensor]:
    """(u, du/dt) of u(z, t, r, y) along tangents (v, 1, 0); no precision handling."""

    def u_of(z_: Tensor, t_: Tensor, r_: Tensor) -> Tensor:
        # Guidance is passed only to models conditioned on it (a plain FlowModel need not take it).
        return model(z_, t_, r_, y) if guidance is None else model(z_, t_, r_, y, guidance)

    return torch.func.jvp(u_of, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))


def jvp_tangent(model: FlowModel, z: Tensor, t: Tensor, r: Tensor, y: Tensor | None, v: Tensor) -> Tensor:
    """du/dt alone: the function compile and cuda_graph modes compile or capture."""
    return model_jvp(model, z, t, r, y, v)[1]


def jvp_with_primal(
    model: FlowModel,
    z: Tensor,
    t: Tensor,
    r: Tensor,
    y: Tensor | None,
    v: Tensor,
    precision: str,
    guidance: GuidanceInputs | None = None,
) -> tuple[Tensor, Tensor]:
    """(u, du/dt) inside the precision island, du/dt at least fp32.

    Records autograd for u when grad mode is on; du/dt comes back detached.
    """
    with jvp_precision(precision, z.device), detached_tangents():
        u, dudt = model_jvp(model, upcast(z), upcast(t), upcast(r), y, upcast(v), guidance)
    # Detached: zoo's layers computed their parts of it unrecorded, so a graph left on it by the
    # built-in ops would give silently incomplete gradients.
    return u, upcast(dudt).detach()


@contextmanager
def tangent_island(precision: str, device: torch.device) -> Iterator[None]:
    """Where the fused mode computes tangents: no autograd, the JVP's precision."""
    with torch.no_grad(), jvp_precision(precision, device):
        yield


def inverse_permutation(order: Tensor) -> Tensor:
    """The indices that put rows taken in `order` back where they came from."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.shape[0], device=order.device)
    return inverse


def merge(first: Tensor, second: Tensor, times: TimePair) -> Tensor:
    """Put rows computed for times.jvp_index (first) and times.flow_index (second) back in batch order."""
    order = torch.cat([times.jvp_index, times.flow_index])
    return torch.cat([first, second.to(first.dtype)])[inverse_permutation(order)]


class JvpStrategy(ABC):
    """One way to get (u with grad, du/dt detached) for a MeanFlow batch."""

    name: str

    def __init__(self, precision: str = "fp32") -> None:
        if precision not in JVP_PRECISIONS:
            raise ValueError(f"unknown jvp_precision {precision!r}; use one of {JVP_PRECISIONS}")
        self.precision = precision

    @abstractmethod
    def __call__(
        self, model: FlowModel, z: Tensor, t: Tensor, r: Tensor, y: Tensor | None, v: Tensor, times: TimePair
    ) -> tuple[Tensor, Tensor]:
        """z, v: (B, *data_shape); t, r: (B,); times: the TimePair t and r came from."""

    def heads(
        self,
        model: RowTangentModel,
        z: Tensor,
        t: Tensor,
        r: Tensor,
        y: Tensor | None,
        v_rows: Tensor,
        times: TimePair,
        guidance: GuidanceInputs | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """iMF's (u with grad, du/dt detached, the v-head's output with grad) for the whole batch,
        du/dt along (v_rows, 1, 0) on the r != t rows (v_rows: (k, ...) in times.jvp_index order)
        and zero elsewhere.  Only the training modes (fused, nograd) compute it."""
        raise ValueError(f"loss.kind=imf computes its JVP with jvp=fused or nograd, not {self.name!r}")


class NogradJvp(JvpStrategy):
    """Reference: a no-grad JVP over the whole batch, then a separate grad forward. Simplest,
    obviously right."""

    name = "nograd"

    def __call__(self, model, z, t, r, y, v, times):
        with torch.no_grad():
            _, dudt = jvp_with_primal(model, z, t, r, y, v, self.precision)
        return model(z, t, r, y), dudt

    def heads(self, model, z, t, r, y, v_rows, times, guidance):
        u, v = model.forward_heads(z, t, r, y, guidance)
        dudt = torch.zeros_like(upcast(u.detach()))
        if times.n_jvp == 0:
            return u, dudt, v
        ji = times.jvp_index
        g_rows = None if guidance is None else guidance.rows(ji)
        with torch.no_grad():
            _, dudt_rows = jvp_with_primal(
                model, z[ji], t[ji], r[ji], select(y, ji), v_rows, self.precision, g_rows
            )
        return u, dudt.index_copy_(0, ji, dudt_rows.to(dudt.dtype)), v


class FullBatchJvp(JvpStrategy):
    """One JVP with grad over the whole batch; its primal output is the prediction. Static shapes."""

    name = "full_batch"

    def __call__(self, model, z, t, r, y, v, times):
        u, dudt = jvp_with_primal(model, z, t, r, y, v, self.precision)
        return u, dudt.detach()


class PrimalJvp(JvpStrategy):
    """JVP with grad (primal reused) on the r != t samples only, a plain grad forward on the rest."""

    name = "primal"

    def __call__(self, model, z, t, r, y, v, times):
        if times.n_jvp == z.shape[0]:
            u, dudt = jvp_with_primal(model, z, t, r, y, v, self.precision)
            return u, dudt.detach()
        if times.n_jvp == 0:
            u = model(z, t, r, y)
            return u, torch.zeros_like(upcast(u))
        ji, fi = times.jvp_index, times.flow_index
        u_jvp, dudt_jvp = jvp_with_primal(model, z[ji], t[ji], r[ji], select(y, ji), v[ji], self.precision)
        u_flow = model(z[fi], t[fi], r[fi], select(y, fi))
        dudt = merge(dudt_jvp.detach(), torch.zeros_like(u_flow, dtype=dudt_jvp.dtype), times)
        return merge(u_jvp, u_flow, times), dudt


class FusedJvp(JvpStrategy):
    """One grad forward over the whole batch that also carries du/dt of the r != t rows.

    The prediction is that forward's output (as flow matching's); du/dt is computed layer by
    layer next to it for the k rows only, without autograd (zoo.models.dual).  Under bf16/fp16
    autocast the tangent is taken at the reduced-precision activations (bf16-size error in du/dt,
    like the prediction's, where the other modes take the whole JVP in the fp32 island).
    """

    name = "fused"

    def __init__(self, precision: str = "fp32", kernels: str = "auto") -> None:
        super().__init__(precision)
        if kernels not in ("auto", "torch", "triton"):
            raise ValueError(f"unknown jvp_kernels {kernels!r}; use 'auto', 'torch' or 'triton'")
        # The group-norm tangents' implementation (zoo.models.group_norm_tangent_kernel).
        self.kernels = kernels

    def kernels_on(self, device: torch.device) -> str:
        """The group-norm tangents' implementation on `device`: "auto" resolved, "triton" checked
        by the rule zoo.training.jvp_plan.check_tangent_kernels applies before a run starts."""
        # Not while compiling: the checks are host work dynamo would break the graph on, and a
        # compiled step computes the tangents with PyTorch operations anyway.
        if torch.compiler.is_compiling():
            return "torch" if self.kernels == "auto" else self.kernels
        if self.kernels == "triton" and (message := group_norm_tangent_kernel.refusal(device)):
            raise ValueError(message)
        return group_norm_tangent_kernel.resolve(self.kernels, device)

    def __call__(self, model, z, t, r, y, v, times):
        if times.n_jvp == 0:
            u = model(z, t, r, y)
            return u, torch.zeros_like(upcast(u))
        u, dudt, _ = self.rows_pass(model, z, t, r, y, v[times.jvp_index], times, None, with_v=False)
        return u, dudt

    def heads(self, model, z, t, r, y, v_rows, times, guidance):
        if times.n_jvp == 0:
            u, v = model.forward_heads(z, t, r, y, guidance)
            return u, torch.zeros_like(upcast(u.detach())), v
        return self.rows_pass(model, z, t, r, y, v_rows, times, guidance, with_v=True)

    def rows_pass(
        self,
        model: FlowModel,
        z: Tensor,
        t: Tensor,
        r: Tensor,
        y: Tensor | None,
        v_rows: Tensor,
        times: TimePair,
        guidance: GuidanceInputs | None,
        with_v: bool,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """One forward of the batch carrying the r != t rows' tangent (n_jvp > 0)."""
        kernels = self.kernels_on(z.device)
        if not isinstance(model, RowTangentModel):
            raise ValueError(
                f"jvp='fused' needs a network whose forward also runs on Duals (a RowTangentModel, as "
                f"zoo's MLP, U-Net and DiT are); {type(model).__name__} is not one: use jvp='nograd'"
            )
        # The r != t samples go first: every layer then reads its k rows as a view (a slice)
        # instead of gathering them, one gather fewer for every layer that reads them.  The
        # forward is row-wise, so the order changes no value; u goes back to batch order.
        k, order = times.n_jvp, torch.cat([times.jvp_index, times.flow_index])
        island = functools.partial(tangent_island, self.precision, z.device)
        with island():
            dz = upcast(v_rows)
        u_ordered, dudt_rows, v_ordered = model.heads_with_row_tangents(
            z[order],
            t[order],
            r[order],
            select(y, order),
            slice(0, k),
            dz,
            island,
            kernels,
            None if guidance is None else guidance.rows(order),
            with_v,
        )
        inverse = inverse_permutation(order)
        dudt_rows = upcast(dudt_rows)  # bf16 under jvp_precision="bf16"; the target wants fp32
        dudt = torch.zeros((z.shape[0], *dudt_rows.shape[1:]), dtype=dudt_rows.dtype, device=z.device)
        v = None if v_ordered is None else v_ordered[inverse]
        return u_ordered[inverse], dudt.index_copy_(0, times.jvp_index, dudt_rows), v


class SelectiveJvp(JvpStrategy):
    """A no-grad JVP on the r != t samples + a grad forward on all: the prediction at the caller's
    precision, the JVP only where the target needs it."""

    name = "selective"

    def __call__(self, model, z, t, r, y, v, times):
        u = model(z, t, r, y)
        if times.n_jvp == 0:
            return u, torch.zeros_like(upcast(u))
        ji = times.jvp_index
        with torch.no_grad():
            _, dudt_jvp = jvp_with_primal(model, z[ji], t[ji], r[ji], select(y, ji), v[ji], self.precision)
        rest = torch.zeros(
            (times.flow_index.shape[0], *dudt_jvp.shape[1:]), dtype=dudt_jvp.dtype, device=z.device
        )
        return u, merge(dudt_jvp, rest, times)


class CompileJvp(JvpStrategy):
    """The nograd structure with the JVP under torch.compile (one compile per shape/dtype/model).

    The precision island stays outside the compiled region (dynamo guards on the autocast state).
    Compiling takes tens of seconds.  It pays off where launches bound the step (a small MLP), but
    compiling the whole fused step (train.compile) gained more there, and on a convolution-bound
    U-Net it gained nothing (EXPERIMENT_LOG.md): `zoo bench-jvp --modes compile` measures it.
    """

    name = "compile"

    def __init__(self, precision: str = "fp32", backend: str = "inductor") -> None:
        super().__init__(precision)
        self.backend = backend
        self.compiled = torch.compile(jvp_tangent, backend=backend, dynamic=False)

    def __call__(self, model, z, t, r, y, v, times):
        with torch.no_grad(), jvp_precision(self.precision, z.device):
            dudt = self.compiled(model, upcast(z), upcast(t), upcast(r), y, upcast(v))
        return model(z, t, r, y), upcast(dudt)


class CudaGraphJvp(JvpStrategy):
    """The nograd structure with the full-batch no-grad JVP replayed from a captured CUDA graph.

    Inputs are copied into static buffers; the graph reads the parameters' storage in place, so
    in-place optimiser updates are seen at every replay.  The graph is recaptured whenever
    anything it baked in changes: the model object, train/eval mode, input shapes or dtypes,
    label presence, or any parameter/buffer storage (a replaced tensor, e.g. after `.to()` or
    `p.data = ...`, would otherwise leave the graph reading stale weights).  The model must be
    capturable (no host syncs such as .item() in forward).
    """

    name = "cuda_graph"

    def __init__(self, precision: str = "fp32", warmup: int = 2) -> None:
        super().__init__(precision)
        self.warmup = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: tuple | None = None
        self.inputs: dict[str, Tensor] = {}
        self.output: Tensor | None = None
        self.captures = 0

    @staticmethod
    def graph_key(model: FlowModel, z: Tensor, t: Tensor, v: Tensor, y: Tensor | None) -> tuple:
        storage = tuple(p.data_ptr() for p in model.parameters()) + tuple(
            b.data_ptr() for b in model.buffers()
        )
        labels = None if y is None else (tuple(y.shape), y.dtype)
        return (
            id(model),
            model.training,
            tuple(z.shape),
            z.dtype,
            t.dtype,
            v.dtype,
            labels,
            z.device,
            storage,
        )

    def capture(self, model: FlowModel, z: Tensor, t: Tensor, r: Tensor, y: Tensor | None, v: Tensor) -> None:
        self.graph, self.key = None, None  # release the old graph's pool; no stale key if this fails
        self.inputs = {
            "z": upcast(z).clone(),
            "t": upcast(t).clone(),
            "r": upcast(r).clone(),
            "v": upcast(v).clone(),
        }
        if y is not None:
            self.inputs["y"] = y.clone()
        s = self.inputs

        def run() -> Tensor:
            with torch.no_grad(), jvp_precision(self.precision, z.device):
                return jvp_tangent(model, s["z"], s["t"], s["r"], s.get("y"), s["v"])

        with cuda_graphs.device_rng_kept(z.device):
            cuda_graphs.warm_up(run, z.device, self.warmup)
            self.graph, self.output = cuda_graphs.capture(run)
        self.captures += 1

    def __call__(self, model, z, t, r, y, v, times):
        # A run is refused this mode off CUDA before it starts (jvp_plan.check_mode_device); this
        # guards a direct call.
        if z.device.type != "cuda":
            raise RuntimeError(
                f"jvp='cuda_graph' needs a CUDA device but the batch is on {z.device}; "
                "use jvp='fused' or 'nograd' there"
            )
        key = self.graph_key(model, z, t, v, y)
        if key != self.key:
            self.capture(model, z, t, r, y, v)
            self.key = key  # only once the capture succeeded
        s = self.inputs
        s["z"].copy_(z)
        s["t"].copy_(t)
        s["r"].copy_(r)
        s["v"].copy_(v)
        if y is not None:
            s["y"].copy_(y)
        self.graph.replay()
        # Clone: the next replay overwrites the static output.
        return model(z, t, r, y), upcast(self.output.clone())


STRATEGIES: dict[str, type[JvpStrategy]] = {
    cls.name: cls
    for cls in (NogradJvp, FullBatchJvp, PrimalJvp, FusedJvp, SelectiveJvp, CompileJvp, CudaGraphJvp)
}


def build_jvp(mode: str, precision: str = "fp32", kernels: str = "auto") -> JvpStrategy:
    if mode == "auto":
        raise ValueError(
            "jvp='auto' must be resolved to a concrete mode before building the loss: "
            "zoo.training.jvp_plan.plan_run(cfg, device).mode"
        )
    if mode not in STRATEGIES:
        raise ValueError(f"unknown jvp mode {mode!r}; use one of {sorted(STRATEGIES)} or 'auto'")
    if mode == "fused":
        return FusedJvp(precision, kernels)  # the other modes have no kernels of their own to choose
    return STRATEGIES[mode](precision)
