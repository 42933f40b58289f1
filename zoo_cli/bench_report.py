"""`zoo bench-jvp`'s table and summary lines, from a BenchResult."""

from rich.markup import escape
from rich.table import Table

from zoo.bench.jvp_bench import (
    COMPILE,
    EAGER,
    GRAPH,
    MEANFLOW_STEP,
    OBJECTIVE_STEP,
    BenchResult,
    CaseResult,
    loss_variant_suffix,
)
from zoo.units import format_bytes

REFERENCE_LABELS = {
    "forward": "forward",
    "fm_step": "FM step",
    "fm_step+graph": "FM step (graph)",
    "fm_step+compile": "FM step (compiled)",
}
VARIANT_LABELS = {EAGER: "", GRAPH: " (graph)", COMPILE: " (compiled)"}
OBJECTIVE_LABELS = {
    "imf": "iMF fused",
    "imf_cond": "iMF class-cond., guidance inputs, fused",
    "alphaflow": "α-Flow α=0.5 (no JVP)",
}


def case_label(case: CaseResult) -> str:
    variant = VARIANT_LABELS[case.variant]
    if case.kind == MEANFLOW_STEP:
        return f"MeanFlow {case.mode} @{case.ratio:g}{variant}{loss_variant_suffix(case.loss_variant)}"
    if case.kind == OBJECTIVE_STEP:
        return f"{OBJECTIVE_LABELS[case.objective]} @{case.ratio:g}"
    return {"forward": "forward", "jvp": "JVP alone", "fm_step": "FM step"}[case.kind] + variant


def result_table(result: BenchResult) -> Table:
    settings = result.settings
    table = Table(
        title=(
            f"{settings.preset} ({result.parameters / 1e6:.1f}M parameters), batch {settings.batch_size}, "
            f"{settings.precision}, {result.device_name}: medians of {settings.repeats} interleaved rounds"
        ),
        caption="no-grad forward and JVP; steps = loss + backward + Adam; "
        "MeanFlow MODE @RATIO [--loss-variant]; (graph): loss + backward replayed from a CUDA graph; "
        "(compiled): loss + backward by torch.compile"
        + (
            "; a compiled step's peak memory is measured on CUDA only"
            if any(not c.peak_measured for c in result.cases)
            else ""
        ),
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
        if not case.peak_measured:
            memory = "not measured"
        else:
            memory = "OOM" if case.peak_bytes is None else format_bytes(case.peak_bytes)
        if case.fits is False:
            memory += " ✗"
        style = "bold green" if case.name in fastest else ""
        table.add_row(escape(case_label(case)), *timing, *versus, memory, style=style)
    return table


def step_ratios(case: CaseResult) -> str:
    return f"MeanFlow step / {REFERENCE_LABELS[case.reference]} {case.versus.of_medians:.3f}"


def eager_ratio(case: CaseResult) -> str:
    """A graphed or compiled step's ratio to the eager FM step ("" for an eager step)."""
    return "" if case.versus_eager is None else f"; / eager FM step {case.versus_eager.of_medians:.3f}"


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
            lines.append(
                f"ratio {ratio:g}: no measured MeanFlow mode fits in "
                f"{format_bytes(result.memory_limit_bytes)}"
            )
        elif best.versus is not None:
            lines.append(
                f"ratio {ratio:g}: fastest mode that fits is [bold]{escape(best.label)}[/] — "
                f"{step_ratios(best)} (CPU time {best.versus_cpu.of_medians:.3f})" + eager_ratio(best)
            )
    for case in result.cases:
        if case.kind == MEANFLOW_STEP and not case.peak_measured and case.versus is not None:
            lines.append(
                f"ratio {case.ratio:g}: {escape(case.label)} (peak memory measured on CUDA only) — "
                f"{step_ratios(case)}" + eager_ratio(case)
            )
    for case in result.cases:
        if (ab := case.versus_own_loss) is not None:
            lines.append(
                f"{escape(case.label)} @{case.ratio:g} / the same step without the variant: "
                f"{ab.of_medians:.3f} (paired {ab.paired_median:.3f}, "
                f"per round {ab.paired_min:.2f}–{ab.paired_max:.2f})"
            )
    for case in result.cases:
        if case.kind == OBJECTIVE_STEP and case.versus is not None:
            v = case.versus
            lines.append(
                f"{escape(case_label(case))} / FM step: {v.of_medians:.3f} (per round {v.paired_min:.2f}–"
                f"{v.paired_max:.2f}; CPU time {case.versus_cpu.of_medians:.3f})"
            )
    meanflow = [c for c in result.cases if c.kind == MEANFLOW_STEP]
    if meanflow and all(c.fits is False for c in meanflow):
        lines.append("no MeanFlow case fits: lower --batch-size or raise --memory-limit-gb")
    return lines
