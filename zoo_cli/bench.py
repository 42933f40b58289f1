"""`zoo bench-jvp`: time the JVP strategies against a forward pass and a flow-matching step."""

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from zoo.bench.jvp_bench import (
    MEANFLOW_STEP,
    BenchError,
    BenchResult,
    BenchSettings,
    CaseResult,
    parse_modes,
    parse_ratios,
    run_bench,
)
from zoo.training.memory import format_bytes
from zoo_cli.errors import fail, user_errors
from zoo_cli.render import make_console

console = make_console()


def bench_jvp(
    overrides: Annotated[list[str] | None, typer.Argument(help="dotted config overrides, e.g. model.channels=32")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps")] = "auto",
    model: Annotated[str, typer.Option("--model", help="preset whose model, loss and optimiser are timed")] = "cifar10",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="samples per step")] = 8,
    ratios: Annotated[str, typer.Option(help="MeanFlow ratios (fraction of r != t), comma-separated")] = "0.25,0.5,0.75,1.0",
    modes: Annotated[str | None, typer.Option(help="JVP modes, comma-separated (default: all that run on the device)")] = None,
    precision: Annotated[str, typer.Option(help="fp32 | bf16 (autocast around every case)")] = "fp32",
    repeats: Annotated[int, typer.Option(min=1, help="timed interleaved rounds (medians over these)")] = 5,
    warmup: Annotated[int, typer.Option(min=0, help="untimed rounds after the memory pass")] = 1,
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads (default: torch's)")] = None,
    memory_limit_gb: Annotated[float | None, typer.Option("--memory-limit-gb", help="memory a case may use (default: the device's)")] = None,
    seed: Annotated[int, typer.Option(help="seed of the model and the synthetic batch")] = 0,
    json_path: Annotated[Path | None, typer.Option("--json", help="write every sample and ratio to this JSON file")] = None,
    cuda_graph: Annotated[bool, typer.Option("--cuda-graph", help="also time each step with loss + backward replayed from a CUDA graph (train.cuda_graph)")] = False,
) -> None:
    """Forward, JVP alone, flow-matching step and MeanFlow step per JVP mode and ratio: interleaved medians."""
    with user_errors():
        try:
            settings = BenchSettings(
                preset=model, overrides=tuple(overrides or ()), device=device, batch_size=batch_size,
                ratios=parse_ratios(ratios), modes=parse_modes(modes), precision=precision, repeats=repeats,
                warmup=warmup, seed=seed, threads=threads, memory_limit_gb=memory_limit_gb, cuda_graph=cuda_graph,
            )  # fmt: skip
            result = run_bench(settings, log=lambda line: console.print(line, style="dim", highlight=False))
        except BenchError as exc:
            raise fail(str(exc)) from None
    console.print(result_table(result))
    for line in summary_lines(result):
        console.print(line)
    if json_path is not None:
        result.write_json(json_path)
        console.print(f"results: [bold]{json_path}[/]")


REFERENCE_LABELS = {"forward": "forward", "fm_step": "FM step", "fm_step+graph": "FM step (graph)"}


def case_label(case: CaseResult) -> str:
    graphed = " (graph)" if case.graphed else ""
    if case.kind == MEANFLOW_STEP:
        return f"MeanFlow {case.mode} @{case.ratio:g}{graphed}"
    return {"forward": "forward", "jvp": "JVP alone", "fm_step": "FM step"}[case.kind] + graphed


def result_table(result: BenchResult) -> Table:
    settings = result.settings
    table = Table(
        title=(
            f"{settings.preset} ({result.parameters / 1e6:.1f}M parameters), batch {settings.batch_size}, "
            f"{settings.precision}, {result.device_name}: medians of {settings.repeats} interleaved rounds"
        ),
        caption="no-grad forward and JVP; steps = loss + backward + Adam; MeanFlow MODE @RATIO; "
        "(graph): loss + backward replayed from a CUDA graph",
    )
    table.add_column("case", no_wrap=True)
    table.add_column("median", justify="right", no_wrap=True)
    table.add_column("IQR", justify="right", no_wrap=True)
    table.add_column("ratio", justify="right", no_wrap=True)
    table.add_column("per round", justify="right", no_wrap=True)
    table.add_column("CPU-time ratio", justify="right", no_wrap=True)
    table.add_column("peak mem", justify="right", no_wrap=True)
    fastest = {c.name for r in settings.ratios if (c := result.fastest(r)) is not None}
    for case in result.cases:
        if case.median_s is None:
            timing = ("—", "—")
        else:
            timing = (f"{case.median_s * 1e3:.1f} ms", f"{(case.q3_s - case.q1_s) * 1e3:.1f}")
        if case.versus is None:
            versus = ("", "", "")
        else:
            v, c = case.versus, case.versus_cpu
            versus = (
                f"{v.of_medians:.3f}× {REFERENCE_LABELS[case.reference]}",
                f"{v.paired_min:.2f}–{v.paired_max:.2f}",
                f"{c.of_medians:.3f}",
            )
        memory = "OOM" if case.peak_bytes is None else format_bytes(case.peak_bytes)
        if not case.fits:
            memory += " ✗"
        style = "bold green" if case.name in fastest else ""
        table.add_row(case_label(case), *timing, *versus, memory, style=style)
    return table


def summary_lines(result: BenchResult) -> list[str]:
    lines = []
    jvp = result.case("jvp")
    if jvp.versus is not None:
        lines.append(
            f"JVP / forward: {jvp.versus.of_medians:.3f} (per-round {jvp.versus.paired_min:.2f}–"
            f"{jvp.versus.paired_max:.2f}; CPU time {jvp.versus_cpu.of_medians:.3f})"
        )
    for ratio in result.settings.ratios:
        best = result.fastest(ratio)
        if best is None:
            lines.append(f"ratio {ratio:g}: no MeanFlow mode fits in {format_bytes(result.memory_limit_bytes)}")
        elif best.versus is not None:
            lines.append(
                f"ratio {ratio:g}: fastest mode that fits is [bold]{best.label}[/] — MeanFlow step / "
                f"{REFERENCE_LABELS[best.reference]} {best.versus.of_medians:.3f} (CPU time {best.versus_cpu.of_medians:.3f})"
                + (f"; / eager FM step {best.versus_eager.of_medians:.3f}" if best.versus_eager is not None else "")
            )
    meanflow = [c for c in result.cases if c.kind == MEANFLOW_STEP]
    if meanflow and all(not c.fits for c in meanflow):
        lines.append("no MeanFlow case fits: lower --batch-size or raise --memory-limit-gb")
    return lines
