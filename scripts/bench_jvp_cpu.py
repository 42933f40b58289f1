"""zoo's CPU benchmark table: the paper's CIFAR-10 U-Net, fp32, batch 8, on this CPU.

Times, interleaved in one process after warm-up (zoo.bench): a no-grad forward, the no-grad JVP
alone, a flow-matching training step and a MeanFlow training step (loss + backward + Adam) per
JVP mode at ratios 0.25 and 0.75; prints medians, the ratios to the FM step with their per-round
range, the targets, and another implementation's numbers (EXPERIMENT_LOG.md).  Writes
`<out>/bench.json` and `<out>/bench.log` (its whole output).

    .venv/bin/python scripts/bench_jvp_cpu.py                 # ~1 h on 2 cores
    .venv/bin/python scripts/bench_jvp_cpu.py --repeats 3 --modes primal,full_batch
    .venv/bin/python scripts/bench_jvp_cpu.py --profile       # where the JVP's time goes, instead

The same measurement as `zoo bench-jvp --device cpu --model cifar10 --batch-size 8
--ratios 0.25,0.75 --threads 2`; this script adds the comparison with the targets.
"""

import argparse
import io
import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from torch.profiler import ProfilerActivity, profile

from zoo.bench.jvp_bench import (
    BenchResult,
    BenchSettings,
    meanflow_case,
    parse_modes,
    parse_ratios,
    run_bench,
)
from zoo_cli.bench_report import result_table, summary_lines

# Another implementation measured on the same kind of machine (fp32, batch 8; EXPERIMENT_LOG.md).
OTHERS = {
    "official PyTorch port (55.9M U-Net)": {"0.25": None, "0.75": 1.65, "jvp/forward": 2.73},
}
TARGETS = {"0.25": 1.15, "0.75": 1.40, "jvp/forward": 2.2}


class Tee:
    """Print to the console and append to the script's log file as it goes (a crash keeps the log)."""

    def __init__(self, path: Path) -> None:
        self.handle = open(path, "w")

    def __call__(self, text: str) -> None:
        print(text, flush=True)
        self.handle.write(text + "\n")
        self.handle.flush()


def render(renderable: object) -> str:
    buffer = io.StringIO()
    Console(file=buffer, width=130, color_system=None).print(renderable)
    return buffer.getvalue().rstrip()


def comparison_lines(result: BenchResult) -> list[str]:
    """zoo's best mode per ratio against the targets and another implementation."""
    zoo = {"jvp/forward": result.case("jvp").versus.of_medians}
    ranges = {"jvp/forward": result.case("jvp").versus}
    for ratio in result.settings.ratios:
        best = result.fastest(ratio)
        if best is not None:
            zoo[f"{ratio:g}"] = best.versus.of_medians
            ranges[f"{ratio:g}"] = best.versus
    columns = ["0.25", "0.75", "jvp/forward"]
    lines = [f"{'implementation':44s} " + " ".join(f"{c:>22s}" for c in columns)]

    def cell(value: float | None) -> str:
        return "—" if value is None else f"{value:.2f}"

    for name, values in OTHERS.items():
        lines.append(f"{name:44s} " + " ".join(f"{cell(values[c]):>22s}" for c in columns))
    zoo_cells = []
    for c in columns:
        if c in zoo:
            r = ranges[c]
            zoo_cells.append(f"{zoo[c]:.2f} ({r.paired_min:.2f}–{r.paired_max:.2f})")
        else:
            zoo_cells.append("—")
    lines.append(f"{'zoo (fastest mode; per-round range)':44s} " + " ".join(f"{v:>22s}" for v in zoo_cells))
    lines.append(f"{'target':44s} " + " ".join(f"{'≤ ' + cell(TARGETS[c]):>22s}" for c in columns))
    verdicts = [
        f"{c}: {'met' if zoo[c] <= TARGETS[c] else 'MISSED'} ({zoo[c]:.3f} vs ≤ {TARGETS[c]})"
        for c in columns
        if c in zoo
    ]
    lines.append("targets: " + "; ".join(verdicts))
    return lines


def profile_forward_and_jvp(settings: BenchSettings, log: Tee, rows: int = 25) -> dict:
    """torch.profiler on one no-grad forward and one no-grad JVP (after a warm-up of each):
    self CPU time per operator, the JVP's excess over the forward per operator, and totals."""
    from zoo.bench.steps import data_signature, forward_fn, jvp_fn, synthetic_batch
    from zoo.config.loading import load_config
    from zoo.models import build_model

    torch.set_num_threads(settings.threads)
    cfg = load_config(settings.preset, list(settings.overrides))
    shape, classes = data_signature(cfg.data)
    torch.manual_seed(settings.seed)
    model = build_model(cfg.model, shape, classes).train()
    batch = synthetic_batch(model, settings.batch_size, torch.device("cpu"), cfg.loss, seed=settings.seed)
    runs = {
        "forward": forward_fn(model, batch, "fp32"),
        "jvp": jvp_fn(model, batch, "fp32", cfg.loss.jvp_precision),
    }
    per_op: dict[str, dict[str, tuple[float, int]]] = {}
    for name, run in runs.items():
        run()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        per_op[name] = {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()}
        total = sum(ms for ms, _ in per_op[name].values())
        log(
            f"--- {name}: self CPU time {total:.0f} ms over "
            f"{sum(c for _, c in per_op[name].values())} operator calls"
        )
        for key, (ms, count) in sorted(per_op[name].items(), key=lambda kv: -kv[1][0])[:rows]:
            log(f"{key:55s} {ms:9.1f} ms {100 * ms / total:5.1f}%  x{count}")
    forward, jvp = per_op["forward"], per_op["jvp"]
    totals = {name: sum(ms for ms, _ in ops.values()) for name, ops in per_op.items()}
    log(
        f"--- JVP excess over the forward: {totals['jvp'] - totals['forward']:.0f} ms "
        f"(JVP / forward self time {totals['jvp'] / totals['forward']:.2f})"
    )
    excess = {k: jvp[k][0] - forward.get(k, (0.0, 0))[0] for k in jvp}
    for key, ms in sorted(excess.items(), key=lambda kv: -kv[1])[:rows]:
        calls = jvp[key][1] - forward.get(key, (0.0, 0))[1]
        log(f"{key:55s} {ms:+9.1f} ms  {calls:+d} calls")
    return {"per_op_ms_calls": per_op, "totals_ms": totals}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="cifar10")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ratios", default="0.25,0.75")
    parser.add_argument("--modes", default="fused,full_batch,primal,selective,nograd")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--warmup", type=int, default=0, help="untimed rounds after the memory pass (itself a warm-up)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--profile", action="store_true", help="profile one forward and one JVP instead of timing"
    )
    parser.add_argument(
        "overrides", nargs="*", help="key=value config overrides (e.g. a smaller model to try the script)"
    )
    args = parser.parse_args()
    out = args.out or Path("outputs") / f"bench-jvp-cpu-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    log = Tee(out / "bench.log")
    log("command: " + " ".join([sys.executable, *sys.argv]))
    settings = BenchSettings(
        preset=args.preset,
        overrides=tuple(args.overrides),
        device="cpu",
        batch_size=args.batch_size,
        ratios=parse_ratios(args.ratios),
        modes=parse_modes(args.modes),
        precision="fp32",
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
        threads=args.threads,
    )
    log(f"settings: {settings}")
    if args.profile:
        report = profile_forward_and_jvp(settings, log)
        (out / "profile.json").write_text(json.dumps(report, indent=1))
        log(f"profile in {out / 'profile.json'}")
        return
    result = run_bench(settings, log=log)
    log(render(result_table(result)))
    for line in summary_lines(result):
        log(Console(color_system=None).render_str(line).plain)
    for ratio in settings.ratios:
        per_mode = ", ".join(
            f"{mode} {result.case(meanflow_case(mode, ratio)).versus.of_medians:.3f}"
            for mode in settings.modes
            if result.case(meanflow_case(mode, ratio)).versus is not None
        )
        log(f"MeanFlow / FM step at ratio {ratio:g}: {per_mode}")
    for line in comparison_lines(result):
        log(line)
    log(f"total {result.seconds / 60:.1f} min; results in {out / 'bench.json'}, log in {out / 'bench.log'}")
    result.write_json(out / "bench.json")


if __name__ == "__main__":
    main()
