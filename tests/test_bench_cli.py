"""`zoo bench-jvp` end to end on tiny models: the table, the JSON and its cases, bad options."""

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from zoo.bench.jvp_bench import BenchSettings, data_signature, run_bench
from zoo.config.loading import load_config
from zoo_cli.bench import bench_jvp

app = typer.Typer()
app.command("bench-jvp")(bench_jvp)


@app.callback()
def main() -> None:
    """Subcommands must be named (a one-command Typer app would make it the default)."""


runner = CliRunner()
CPU_MODES = ["fused", "full_batch", "primal", "selective", "nograd"]


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_jvp_on_a_tiny_mlp_writes_every_case_to_json(tmp_path, restore_threads) -> None:
    path = tmp_path / "bench.json"
    result = runner.invoke(
        app,
        [
            "bench-jvp",
            "model.hidden=32",
            "model.depth=2",
            "--device",
            "cpu",
            "--model",
            "moons",
            "--batch-size",
            "16",
            "--ratios",
            "0.25,0.75",
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
    assert result.exit_code == 0, result.output
    assert "JVP / forward" in result.output and "fastest mode that fits" in result.output
    data = json.loads(path.read_text())
    names = [c["name"] for c in data["cases"]]
    expected = ["forward", "jvp", "fm_step"] + [
        f"meanflow/{m}/{r}" for r in ("0.25", "0.75") for m in CPU_MODES
    ]
    assert names == expected
    for case in data["cases"]:
        assert len(case["samples_s"]) == 3 and all(s > 0 for s in case["samples_s"])
        assert case["median_s"] == sorted(case["samples_s"])[1]
        assert case["peak_bytes"] > 0 and case["fits"]
    cases = {c["name"]: c for c in data["cases"]}
    assert cases["jvp"]["reference"] == "forward"
    assert cases["jvp"]["versus"]["of_medians"] == pytest.approx(
        cases["jvp"]["median_s"] / cases["forward"]["median_s"]
    )
    assert cases["meanflow/primal/0.25"]["reference"] == "fm_step"
    # Training steps hold more than a no-grad forward: gradients and Adam state.
    assert cases["fm_step"]["peak_bytes"] > cases["forward"]["peak_bytes"]
    for ratio in ("0.25", "0.75"):
        fastest = data["fastest"][ratio]
        medians = {m: cases[f"meanflow/{m}/{ratio}"]["median_s"] for m in CPU_MODES}
        assert fastest == min(medians, key=medians.get)
    assert data["settings"]["batch_size"] == 16 and data["parameters"] > 0 and data["threads"] == 1


def test_a_loss_variant_times_every_meanflow_step_again_with_its_overrides(
    tmp_path, monkeypatch, restore_threads
) -> None:
    import zoo.bench.jvp_bench as jvp_bench

    built = []  # (adaptive weight p and c, mode, ratio) of every MeanFlow loss the cases were built with
    real_meanflow_loss = jvp_bench.meanflow_loss
    monkeypatch.setattr(
        jvp_bench,
        "meanflow_loss",
        lambda cfg, mode, ratio: (
            built.append((cfg.weight_p, cfg.weight_c, mode, ratio)) or real_meanflow_loss(cfg, mode, ratio)
        ),
    )
    path = tmp_path / "bench.json"
    result = runner.invoke(
        app,
        [
            "bench-jvp",
            "model.hidden=32",
            "model.depth=2",
            "loss.weight_p=1.0",
            "--device",
            "cpu",
            "--model",
            "moons",
            "--batch-size",
            "16",
            "--ratios",
            "0.25,1",
            "--modes",
            "fused,nograd",
            "--repeats",
            "2",
            "--warmup",
            "0",
            "--threads",
            "1",
            "--loss-variant",
            " loss.weight_p=0.0   loss.weight_c=0.01",
            "--json",
            str(path),
        ],
    )
    assert result.exit_code == 0, result.output
    variant = "loss.weight_p=0.0 loss.weight_c=0.01"  # spaces normalised
    # Built in case order: the run's own loss (p=1, the preset's c) for every case, then the variant's.
    own_c = load_config("moons").loss.weight_c
    assert own_c != 0.01
    assert built == [
        (p, c, m, r) for p, c in ((1.0, own_c), (0.0, 0.01)) for r in (0.25, 1.0) for m in ("fused", "nograd")
    ]
    cases = {c["name"]: c for c in json.loads(path.read_text())["cases"]}
    for mode in ("fused", "nograd"):
        for ratio in ("0.25", "1"):
            own, other = cases[f"meanflow/{mode}/{ratio}"], cases[f"meanflow/{mode}/{ratio} [{variant}]"]
            assert own["loss_variant"] == "" and other["loss_variant"] == variant
            assert other["reference"] == "fm_step" and other["median_s"] > 0
            assert other["versus"]["of_medians"] == pytest.approx(
                other["median_s"] / cases["fm_step"]["median_s"]
            )
            assert other["versus_own_loss"]["of_medians"] == pytest.approx(
                other["median_s"] / own["median_s"]
            )
            assert own["versus_own_loss"] is None
    data = json.loads(path.read_text())
    assert [c["name"] for c in data["cases"]][
        3:
    ] == [  # the variant's steps after the run's own, in the same order
        f"meanflow/{m}/{r}{suffix}"
        for suffix in ("", f" [{variant}]")
        for r in ("0.25", "1")
        for m in ("fused", "nograd")
    ]
    output = " ".join(result.output.split())
    assert f"MeanFlow fused @0.25 [{variant}]" in output  # the label, not taken for markup
    assert f"round 1/2 meanflow/fused/0.25 [{variant}]" in output  # the log lines too
    assert f"fused [{variant}] @0.25 / the same step without the variant:" in output


def test_a_case_over_the_memory_limit_is_reported_and_not_timed() -> None:
    settings = BenchSettings(
        preset="cifar10",
        overrides=(
            "model.channels=8",
            "model.channel_mults=[1,2]",
            "model.blocks_per_res=1",
            "model.num_groups=4",
            "model.attention_res=[16]",
        ),
        device="cpu",
        batch_size=2,
        ratios=(1.0,),
        modes=("full_batch", "nograd"),
        repeats=1,
        warmup=0,
    )
    free = run_bench(settings)
    assert free.data_shape == [3, 32, 32]  # the CIFAR-10 preset, without the dataset on disk
    lean, greedy = free.case("meanflow/nograd/1").peak_bytes, free.case("meanflow/full_batch/1").peak_bytes
    # Recording the JVP for backward (full_batch) keeps the tangent's activations as well.
    assert greedy > lean
    limit_gb = (lean + greedy) / 2 / 2**30
    capped = run_bench(BenchSettings(**{**settings.__dict__, "memory_limit_gb": limit_gb}))
    full, nograd = capped.case("meanflow/full_batch/1"), capped.case("meanflow/nograd/1")
    assert full.peak_bytes == greedy and not full.fits
    assert full.median_s is None and full.samples_s == []
    assert nograd.fits and nograd.median_s is not None
    assert capped.fastest(1.0).mode == "nograd"


def test_data_signature_knows_image_shapes_without_the_files() -> None:
    assert data_signature(load_config("cifar10").data) == ((3, 32, 32), 0)
    assert data_signature(load_config("cifar10", ["data.class_conditional=true"]).data) == ((3, 32, 32), 10)
    assert data_signature(load_config("moons").data) == ((2,), 0)
    assert data_signature(load_config("imagenet-latents").data)[0] == (4, 32, 32)


def test_objectives_are_timed_against_the_fm_step(tmp_path, restore_threads) -> None:
    path = tmp_path / "bench.json"
    args = ["model.hidden=32", "model.depth=2", "--device", "cpu", "--model", "moons", "--batch-size", "16"]
    args += ["--ratios", "0.5", "--modes", "fused", "--repeats", "2", "--warmup", "0", "--threads", "1"]
    args += ["--objectives", "imf,imf_cond,alphaflow", "--json", str(path)]
    result = runner.invoke(app, ["bench-jvp", *args])
    assert result.exit_code == 0, result.output
    cases = {c["name"]: c for c in json.loads(path.read_text())["cases"]}
    for name in ("imf/0.5", "imf_cond/0.5", "alphaflow/0.5"):
        case = cases[name]
        assert case["kind"] == "objective_step" and case["reference"] == "fm_step"
        assert case["versus"]["of_medians"] == pytest.approx(case["median_s"] / cases["fm_step"]["median_s"])
    assert "iMF fused @0.5 / FM step" in result.output and "α-Flow" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--modes", "cuda_graph"], "needs a CUDA device"),
        (["--modes", "fastest"], "unknown JVP mode"),
        (["--ratios", "0.5,1.5"], "ratios must be"),
        (["--ratios", "a,b"], "comma-separated numbers"),
        (["--precision", "fp8"], "precision must be"),
        (["--objectives", "imf,sit"], "unknown objective(s) ['sit']"),
        (["--loss-variant", "model.hidden=8"], "loss.KEY=VALUE"),
        (["--loss-variant", "loss.weight_p=0", "--loss-variant", "loss.weight_p=0"], "given twice"),
        (["--loss-variant", "loss.weight_p=9"], "loss.weight_p"),
        (
            ["--loss-variant", "loss.weight_p=0 loss.ratio=0.5"],
            "choose JVP modes with --modes and ratios with --ratios",
        ),
    ],
)
def test_bad_options_fail_with_a_message(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["bench-jvp", "--device", "cpu", "--model", "moons", "--repeats", "1", *args])
    assert result.exit_code == 2
    assert message in result.output
