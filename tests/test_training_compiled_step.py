"""train.compile: a micro-batch's loss and backward compiled by torch.compile.

What must hold: flow matching and fused MeanFlow trace into one graph (no graph break falls back
to eager) on each of zoo's networks; the native operations zoo's layers run while compiling give
exactly the outputs, dtypes and gradients of the eager custom Functions (fp32 and bf16 autocast),
and whole losses, metrics and gradients follow (on networks moved off their zero
initialisation, so every layer carries signal); a real `zoo train` with train.compile compiles
and follows the eager run; settings it cannot run are refused with the fix; `zoo bench-jvp
--compile` times compiled steps against a compiled FM step.
"""

import copy
import functools
import json

import pytest
import torch
import typer
from model_helpers import labelled_cuda_batch, perturb
from tiny_runs import TINY_RUN, train_moons_variants
from typer.testing import CliRunner

from zoo.config.loading import ConfigError, load_config
from zoo.config.schema import DiTConfig, LossConfig, MLPConfig, UNetConfig
from zoo.devices import cuda_fp32_precision
from zoo.errors import CompileError
from zoo.losses import build_loss
from zoo.models import build_model
from zoo.models.layers import Attention, Conv2d, GroupNorm, LayerNorm
from zoo.training.compiled_step import RECOMPILE_LIMIT, compile_evaluate, keeps_grads
from zoo_cli.bench import bench_jvp
from zoo_cli.main import app

UNET = UNetConfig(
    channels=16, channel_mults=[1, 2], blocks_per_res=1, attention_res=[4], dropout=0.0, num_groups=8
)
DIT = DiTConfig(patch_size=2, hidden=32, depth=2, heads=2)
MLP = MLPConfig(hidden=32, depth=2, time_embed_dim=16)
NETWORKS = {"unet": (UNET, (3, 8, 8)), "dit": (DIT, (1, 8, 8)), "mlp": (MLP, (2,))}


def network_and_batch(name: str, classes: int = 3, batch: int = 6):
    cfg, shape = NETWORKS[name]
    torch.manual_seed(0)
    model = perturb(build_model(cfg, shape, classes).train())
    x = torch.randn(batch, *shape)
    y = torch.randint(0, classes, (batch,)) if classes else None
    return model, x, y


def losses():
    # weight_p = 0: the loss is the plain squared error, not ~1 whatever the prediction.
    return {
        "flow_matching": build_loss(LossConfig(kind="flow_matching", class_dropout=0.2)),
        "meanflow": build_loss(
            LossConfig(kind="meanflow", jvp="fused", ratio=0.5, class_dropout=0.2, weight_p=0.0)
        ),
        # The Triton kernels' option: a compiled step uses the PyTorch operations, with no check or branch
        # left in the graph (dynamo would break it on the kernels' availability check).
        "meanflow-triton-kernels": build_loss(
            LossConfig(
                kind="meanflow", jvp="fused", ratio=0.5, class_dropout=0.2, weight_p=0.0, jvp_kernels="triton"
            )
        ),
    }


def graphs_compiled() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# The U-Net's and the DiT's flow matching and MeanFlow losses are compiled with fullgraph=True
# below, which fails on any graph break: here, the rest.
TRACED_HERE = [
    ("unet", "meanflow-triton-kernels"),
    ("dit", "meanflow-triton-kernels"),
    ("mlp", "meanflow-triton-kernels"),
    ("mlp", "flow_matching"),
    ("mlp", "meanflow"),
]


@pytest.mark.parametrize("network, kind", TRACED_HERE)
def test_the_loss_traces_into_one_graph_without_breaks(network, kind) -> None:
    # A graph break would run part of the step eagerly, and custom-jvp Functions break the graph:
    # zoo's layers must switch to native operations while compiling (zoo.models.layers).
    model, x, y = network_and_batch(network)
    loss_fn = losses()[kind]
    draws = loss_fn.draw(model, x, y, torch.Generator().manual_seed(1))
    explained = torch._dynamo.explain(loss_fn.evaluate)(model, x, draws)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def grads_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


LAYERS = {
    "group_norm": (lambda: GroupNorm(4, 8), (3, 8, 5, 5)),
    "layer_norm": (lambda: LayerNorm(12, eps=1e-6, elementwise_affine=False), (3, 7, 12)),
    "layer_norm_affine": (lambda: LayerNorm(12), (3, 7, 12)),
    "conv": (lambda: Conv2d(8, 6, 3, stride=2, padding=1), (3, 8, 9, 9)),
    "conv_dilated": (lambda: Conv2d(8, 8, 3, padding=2, dilation=2, groups=2), (2, 8, 6, 6)),
    "attention": (lambda: Attention(16, heads=2), (3, 10, 16)),
}


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_each_layer_compiled_gives_the_eager_output_dtype_and_gradients_exactly(layer, precision) -> None:
    # The compiled branch swaps zoo's Function for the native op: same eps, affine parameters,
    # conv geometry, attention scale and autocast dtypes, so aot_eager (no code generation)
    # must reproduce eager bit for bit.  bf16: activations arrive in bf16, as in the networks.
    make, shape = LAYERS[layer]
    torch.manual_seed(0)
    module = perturb(make())
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    x = torch.randn(shape).to(dtype)
    compiled = torch.compile(module, backend="aot_eager", dynamic=False, fullgraph=True)
    results = {}
    for name, run in (("eager", module), ("compiled", compiled)):
        module.zero_grad(set_to_none=True)
        inputs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = run(inputs)
        out.float().square().sum().backward()
        results[name] = out.detach(), inputs.grad, grads_of(module)
    (want, want_dx, want_grads), (got, got_dx, got_grads) = results["eager"], results["compiled"]
    assert got.dtype == want.dtype and got_dx.dtype == want_dx.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_dx, want_dx, rtol=0, atol=0)
    assert len(got_grads) == len(want_grads) == len([p for p in module.parameters()])
    for g, w in zip(got_grads, want_grads, strict=True):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("network", ["unet", "dit"])
@pytest.mark.parametrize(
    "kind, precision", [("flow_matching", "fp32"), ("meanflow", "fp32"), ("meanflow", "bf16")]
)
def test_compiled_loss_and_backward_give_the_eager_loss_and_gradients(network, kind, precision) -> None:
    # aot_eager runs the traced forward and the backward AOTAutograd derives from it without
    # inductor's code generation: what differs from eager is exactly the native operations of the
    # compiled branch and their autograd-derived derivatives (the eager path uses zoo's Functions).
    # The network is moved off its zero initialisation (network_and_batch), so u and du/dt are
    # not zero and every parameter gets a gradient: each layer's compiled backward and the fused
    # tangent under tracing are compared, not just the output layer's.  fullgraph=True: a graph
    # break fails the test.  bf16 with MeanFlow only: its step runs the network's forward as flow
    # matching's does, and adds the tangents (each layer's bf16 path is checked exactly above).
    model, x, y = network_and_batch(network)
    loss_fn = losses()[kind]
    draws = loss_fn.draw(model, x, y, torch.Generator().manual_seed(2))
    compiled = torch.compile(loss_fn.evaluate, backend="aot_eager", dynamic=False, fullgraph=True)
    dtype = torch.bfloat16 if precision == "bf16" else None
    results = {}
    for name, evaluate in (("eager", loss_fn.evaluate), ("compiled", compiled)):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss, metrics = evaluate(model, x, draws)
        loss.backward()
        results[name] = loss.detach(), metrics, grads_of(model)
    (eager_loss, eager_metrics, eager_grads), (loss, metrics, grads) = results["eager"], results["compiled"]
    # Float reassociation in the traced graph only: a 1 % error in one layer's tangent moves the
    # gradients by ~10 %.  Per tensor, relative to its largest entry.
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=0)
    assert metrics.keys() == eager_metrics.keys()
    for name in metrics:
        torch.testing.assert_close(metrics[name], eager_metrics[name], rtol=1e-5, atol=0)
    assert len(grads) == len(eager_grads) == len(list(model.parameters()))
    for got, want in zip(grads, eager_grads, strict=True):
        assert want.norm() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_zoo_train_with_train_compile_follows_the_eager_run(tmp_path, monkeypatch) -> None:
    # Inductor's kernels, through the trainer: same draws, same losses up to float reassociation.
    monkeypatch.chdir(tmp_path)
    common = [*TINY_RUN, "loss.kind=meanflow", "loss.jvp=fused", "tracking.enabled=false", "--steps", "15"]
    ((eager, _),) = train_moons_variants(app, common, {"eager": []}).values()
    before = graphs_compiled()
    ((compiled, output),) = train_moons_variants(app, common, {"compiled": ["train.compile=true"]}).values()
    # Something was compiled (an eager fall-back would also match the eager losses).
    assert graphs_compiled() > before
    assert "torch.compile" in output
    assert len(compiled) == len(eager) == 3
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4, atol=1e-6)


def test_a_shape_beyond_the_recompile_limit_is_an_error_not_a_silent_eager_step(monkeypatch) -> None:
    # torch's default would run the function eagerly from then on, without a word.
    monkeypatch.setattr("zoo.training.compiled_step.RECOMPILE_LIMIT", 2)
    # The limit is dynamo's, met before any backend runs: aot_eager spares inductor's code generation.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    model, _, _ = network_and_batch("mlp", classes=0)
    loss_fn = losses()["flow_matching"]
    evaluate = compile_evaluate(loss_fn, "default")
    generator = torch.Generator().manual_seed(0)
    for batch in (4, 5):
        x = torch.randn(batch, 2)
        evaluate(model, x, loss_fn.draw(model, x, None, generator))
    x = torch.randn(6, 2)
    with pytest.raises(CompileError, match=r"2 micro-batch shapes .* train\.compile=false"):
        evaluate(model, x, loss_fn.draw(model, x, None, generator))
    assert RECOMPILE_LIMIT > 8  # zoo's own limit is above torch's default


def test_compile_with_cuda_graph_is_refused_at_load_with_the_mode_that_does_both() -> None:
    with pytest.raises(ConfigError, match=r"train\.compile_mode=reduce-overhead"):
        load_config("moons", ["train.compile=true", "train.cuda_graph=true"])


bench_app = typer.Typer()
bench_app.command("bench-jvp")(bench_jvp)


@bench_app.callback()
def bench_main() -> None:
    """Subcommands must be named."""


def test_bench_jvp_compile_times_compiled_steps_against_the_compiled_fm_step(tmp_path) -> None:
    # The network, batch and ratio of the `zoo train` above (TINY_RUN, moons' loss.ratio): inductor's
    # cache serves the MeanFlow step's kernels that run compiled, instead of generating them again.
    path = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    before = graphs_compiled()
    try:
        result = CliRunner().invoke(
            bench_app,
            [
                "bench-jvp",
                "model.hidden=64",
                "model.depth=2",
                "--device",
                "cpu",
                "--model",
                "moons",
                "--batch-size",
                "64",
                "--ratios",
                "0.75",
                "--modes",
                "fused,primal",
                "--compile",
                "--repeats",
                "3",
                "--warmup",
                "0",
                "--threads",
                "1",
                "--json",
                str(path),
            ],
        )
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    assert graphs_compiled() - before >= 2  # the FM and the MeanFlow steps, each really compiled
    assert "MeanFlow fused @0.75 (compiled)" in result.output and "FM step (compiled)" in result.output
    cases = {c["name"]: c for c in json.loads(path.read_text())["cases"]}
    assert "meanflow/primal/0.75+compile" not in cases  # torch.func.jvp does not compile
    compiled = cases["meanflow/fused/0.75+compile"]
    assert compiled["variant"] == "compile" and compiled["reference"] == "fm_step+compile"
    assert len(compiled["samples_s"]) == 3 and compiled["median_s"] > 0
    assert compiled["versus"]["of_medians"] == pytest.approx(
        compiled["median_s"] / cases["fm_step+compile"]["median_s"]
    )
    assert compiled["versus_eager"]["of_medians"] == pytest.approx(
        compiled["median_s"] / cases["fm_step"]["median_s"]
    )
    # The memory meter stops torch.compile on a CPU: the peak is reported as not measured, not
    # guessed, whether it fits is unknown, and it is never named the fastest mode that fits.
    assert not compiled["peak_measured"] and compiled["peak_bytes"] is None and compiled["fits"] is None
    assert json.loads(path.read_text())["fastest"]["0.75"] in ("fused", "primal")
    assert "fused+compile (peak memory measured on CUDA only)" in result.output
    assert cases["fm_step"]["peak_measured"] and cases["fm_step"]["peak_bytes"] > 0


def test_bench_jvp_compile_without_a_compilable_mode_names_the_fix() -> None:
    result = CliRunner().invoke(
        bench_app, ["bench-jvp", "--device", "cpu", "--model", "moons", "--modes", "primal", "--compile"]
    )
    assert result.exit_code != 0
    assert "add one to --modes" in result.output


# ----------------------------------------------------------------------------- CUDA

CUDA = torch.cuda.is_available()


def eager_and_compiled_cuda_unets(compile_mode: str):
    """Two copies of one perturbed U-Net on CUDA, the MeanFlow loss, and its compiled evaluate.

    jvp_precision=fp32: the eager tangent in IEEE fp32 like the compiled one, which follows the
    process-wide flags (IEEE inside cuda_fp32_precision("ieee")): what differs is the compilation.
    """
    torch.manual_seed(0)
    eager_model = perturb(build_model(UNET, (3, 8, 8), 3)).cuda().train()
    loss_fn = build_loss(
        LossConfig(
            kind="meanflow", jvp="fused", ratio=0.5, class_dropout=0.2, jvp_precision="fp32", weight_p=0.0
        )
    )
    return eager_model, copy.deepcopy(eager_model), loss_fn, compile_evaluate(loss_fn, compile_mode)


@pytest.mark.skipif(
    not CUDA, reason="needs a CUDA device (inductor's GPU kernels, CUDA graphs); none on this machine"
)
@pytest.mark.parametrize("compile_mode", ["default", "reduce-overhead"])
def test_compiled_cuda_steps_follow_eager_steps_as_the_weights_change(compile_mode) -> None:
    eager_model, compiled_model, loss_fn, compiled = eager_and_compiled_cuda_unets(compile_mode)
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (eager_model, compiled_model)]
    generator = torch.Generator(device="cuda").manual_seed(1)
    with cuda_fp32_precision("ieee"):
        for _ in range(4):
            x, draws = labelled_cuda_batch(loss_fn, eager_model, generator)
            eager_loss, eager_metrics = loss_fn.evaluate(eager_model, x, draws)
            compiled_loss, metrics = compiled(compiled_model, x, draws)
            eager_loss.backward()
            compiled_loss.backward()
            torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(metrics["mse"], eager_metrics["mse"], rtol=1e-4, atol=1e-6)
            for got, want in zip(grads_of(compiled_model), grads_of(eager_model), strict=True):
                torch.testing.assert_close(
                    got, want, rtol=1e-3, atol=1e-5 * want.abs().max().item()
                )  # as on the CPU
            optimizers[0].step()
            optimizers[0].zero_grad(set_to_none=True)
            optimizers[1].step()
            optimizers[1].zero_grad(set_to_none=not keeps_grads(compile_mode))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (CUDA graphs); none on this machine")
@pytest.mark.parametrize(
    "compile_mode", ["reduce-overhead"]
)  # max-autotune: same graph path, minutes of autotuning
def test_micro_batches_accumulate_under_compile_modes_with_cuda_graphs(compile_mode) -> None:
    # Under CUDA graphs the backward's outputs live in the graphs' pool: the second micro-batch's
    # replay must not overwrite the first one's gradient (compiled_step keeps .grad buffers of its
    # own).  Two steps of two micro-batches each, against the eager sum.
    eager_model, compiled_model, loss_fn, compiled = eager_and_compiled_cuda_unets(compile_mode)
    generator = torch.Generator(device="cuda").manual_seed(3)
    with cuda_fp32_precision("ieee"):
        for _ in range(2):
            for _ in range(2):
                x, draws = labelled_cuda_batch(loss_fn, eager_model, generator)
                (loss_fn.evaluate(eager_model, x, draws)[0] / 2).backward()
                (compiled(compiled_model, x, draws)[0] / 2).backward()
            for got, want in zip(grads_of(compiled_model), grads_of(eager_model), strict=True):
                torch.testing.assert_close(
                    got, want, rtol=1e-3, atol=1e-5 * want.abs().max().item()
                )  # as on the CPU
            eager_model.zero_grad(set_to_none=True)
            compiled_model.zero_grad(set_to_none=not keeps_grads(compile_mode))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device; none on this machine")
def test_zoo_train_on_cuda_with_reduce_overhead_and_grad_accum_follows_the_eager_run(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    common = [
        *TINY_RUN,
        "device=cuda",
        "loss.kind=meanflow",
        "loss.jvp=fused",
        "tracking.enabled=false",
        "train.grad_accum=2",
        "--steps",
        "15",
    ]
    compiled = ["train.compile=true", "train.compile_mode=reduce-overhead"]
    runs = train_moons_variants(app, common, {"eager": [], "compiled": compiled})
    (eager, _), (compiled, _) = runs["eager"], runs["compiled"]
    assert len(compiled) == len(eager) == 3
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-3, atol=1e-5)
