"""`zoo bench-jvp`: time the JVP strategies against a forward pass and a flow-matching step."""

from pathlib import Path
from typing import Annotated

import typer

from zoo.config.schema import MAX_BATCH, MAX_SEED, MAX_THREADS
from zoo.output_paths import check_writable_file
from zoo_cli.errors import fail, user_errors
from zoo_cli.options import DeviceOption
from zoo_cli.render import make_console

console = make_console()


def bench_jvp(
    overrides: Annotated[
        list[str] | None, typer.Argument(help="dotted config overrides, e.g. model.channels=32")
    ] = None,
    device: DeviceOption = "auto",
    model: Annotated[
        str, typer.Option("--model", help="preset whose model, loss and optimiser are timed")
    ] = "cifar10",
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, max=MAX_BATCH, help="samples per step")
    ] = 8,
    ratios: Annotated[
        str, typer.Option(help="MeanFlow ratios (fraction of r != t), comma-separated")
    ] = "0.25,0.5,0.75,1.0",
    modes: Annotated[
        str | None, typer.Option(help="JVP modes, comma-separated (default: all that run on the device)")
    ] = None,
    precision: Annotated[str, typer.Option(help="fp32 | bf16 (autocast around every case)")] = "fp32",
    repeats: Annotated[
        int, typer.Option(min=1, max=1000, help="timed interleaved rounds (medians over these)")
    ] = 5,
    warmup: Annotated[int, typer.Option(min=0, max=1000, help="untimed rounds after the memory pass")] = 1,
    threads: Annotated[
        int | None, typer.Option(min=1, max=MAX_THREADS, help="torch CPU threads (default: torch's)")
    ] = None,
    memory_limit_gb: Annotated[
        float | None,
        typer.Option(
            "--memory-limit-gb", min=0.001, max=65536, help="memory a case may use (default: the device's)"
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(min=0, max=MAX_SEED, help="seed of the model and the synthetic batch")
    ] = 0,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="write every sample and ratio to this JSON file")
    ] = None,
    cuda_graph: Annotated[
        bool,
        typer.Option(
            "--cuda-graph",
            help="also time each step with loss + backward replayed from a CUDA graph (train.cuda_graph)",
        ),
    ] = False,
    compile_steps: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="also time FM and fused MeanFlow steps with loss + backward compiled (train.compile)",
        ),
    ] = False,
    compile_mode: Annotated[
        str,
        typer.Option(
            "--compile-mode",
            help="torch.compile mode for --compile: default | reduce-overhead | max-autotune | "
            "max-autotune-no-cudagraphs",
        ),
    ] = "default",
    loss_variants: Annotated[
        list[str] | None,
        typer.Option(
            "--loss-variant",
            help="also time every MeanFlow step with these space-separated loss.KEY=VALUE overrides, "
            "in the same run (repeatable), e.g. 'loss.jvp_kernels=torch'",
        ),
    ] = None,
    objectives: Annotated[
        str | None,
        typer.Option(
            help="also time these objectives' steps against the FM step, comma-separated: imf, imf_cond "
            "(class-conditional with guidance inputs), alphaflow",
        ),
    ] = None,
) -> None:
    """Forward, JVP alone, flow-matching step and MeanFlow step per JVP mode and ratio:
    interleaved medians."""
    if json_path is not None:
        with user_errors():  # before the benchmark (and torch's import), not after minutes of it
            check_writable_file(json_path, "--json")
    from zoo.bench.jvp_bench import BenchError, BenchSettings, parse_modes, parse_ratios, run_bench
    from zoo_cli.bench_report import result_table, summary_lines

    with user_errors():
        try:
            settings = BenchSettings(
                preset=model,
                overrides=tuple(overrides or ()),
                device=device,
                batch_size=batch_size,
                ratios=parse_ratios(ratios),
                modes=parse_modes(modes),
                precision=precision,
                repeats=repeats,
                warmup=warmup,
                seed=seed,
                threads=threads,
                memory_limit_gb=memory_limit_gb,
                cuda_graph=cuda_graph,
                compile=compile_steps,
                compile_mode=compile_mode,
                loss_variants=tuple(" ".join(v.split()) for v in loss_variants or ()),
                objectives=parse_modes(objectives) or (),
            )
            result = run_bench(
                settings, log=lambda line: console.print(line, style="dim", highlight=False, markup=False)
            )
        except BenchError as exc:
            raise fail(str(exc)) from None
    console.print(result_table(result))
    for line in summary_lines(result):
        console.print(line)
    if json_path is not None:
        result.write_json(json_path)
        console.print(f"results: [bold]{json_path}[/]")
