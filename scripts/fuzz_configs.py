"""Fuzz zoo's configuration and command-line arguments as a hostile operator would.

    PYTHONPATH=. python scripts/fuzz_configs.py --attempts 400 --seed 0 --threads 1

Each attempt runs one command in-process (typer's CliRunner) in a scratch folder with one
malformed input: a dotted override of a wrong type, out of range or unknown; a `ZOO_` variable;
a preset file (invalid TOML, not UTF-8, wrong types, unknown keys, a folder named *.toml); or a
hostile command-line value for `zoo train`, `zoo sample` or `zoo eval`.  An attempt passes if
the command either refuses it the way zoo promises (exit 2, no traceback, nothing written: a
one-line "error: ..." or typer's own usage message for an unparsable option) or accepts it as a
valid input.  Training itself is replaced by a stand-in that records the accepted config (the
fuzzer checks what is refused before any work, and a valid `train.steps=100000000` must not
train for days); sampling and evaluation run for real on a 2-step checkpoint made at the start.

Prints its configuration, progress, and attempts / passed / failures; writes every attempt to
fuzz_configs.json beside --out's log.
"""

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from typer.testing import CliRunner

from zoo.config import config_to_toml, load_config
from zoo.config.loading import MODEL_CLASSES
from zoo.config.schema import ZooConfigBody
from zoo.training import trainer
from zoo_cli.main import app

TINY = [
    "model.hidden=32",
    "model.depth=2",
    "train.batch_size=32",
    "train.steps=2",
    "train.save_every=2",
    "eval.n_samples=64",
    "eval.batch_size=64",
    "eval.meanflow_steps=[1]",
    'eval.solvers=["euler"]',
    "eval.solver_nfe=[2]",
    "loss.jvp=nograd",
    "experiment_log=",
    "tracking.enabled=false",
    "device=cpu",
]
HOSTILE_VALUES = [
    "true", "false", "yes", "no", '"100"', '"true"', "1e10", "99999999999999999999", "-1", "0", "1",
    "inf", "-inf", "nan", "1.5", "-0.0", '""', "", "[]", "[1,", "{}", "{not", "[1, 2]", '["x"]',
    "none", "null", "x" * 300, "é", "\\u0000", "'single'", "1_000", "0x10", "2**40", " 5 ",
]  # fmt: skip
HOSTILE_ARGS = [
    "-1", "0", "1", "1000000000", "99999999999999999999", "1e3", "abc", "", "inf", "nan", "-inf",
    "2.5", "tpu", "cuda:99", "cpu", " ", "--", "4294967296", "1001", "16", "15",
]  # fmt: skip
TOML_BODIES = [
    "[train\nsteps = 2\n",
    'steps = "100"\n',
    '[train]\nsteps = "100"\n',
    "[train]\nsteps = true\n",
    "[train]\nauto_microbatch = 1\n",
    "[train]\nmemory_limit_gb = inf\n",
    "[loss]\nweight_c = nan\n",
    "train = 5\n",
    "[nope]\nx = 1\n",
    "[model]\narch = 'transformer'\n",
    "output_dir = ''\n",
    "",
    "[train]\nsteps = 99999999999999999999\n",
]


def schema_keys() -> list[str]:
    """Every dotted key of the configuration, the model's of every architecture."""
    keys = []
    for name, field in ZooConfigBody.model_fields.items():
        annotation = field.annotation
        if name == "model":
            keys += sorted({f"model.{k}" for cls in MODEL_CLASSES.values() for k in cls.model_fields})
        elif isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            keys += [f"{name}.{k}" for k in annotation.model_fields]
        else:
            keys.append(name)
    return keys


class Accepted(Exception):
    """Raised by the stand-in for training: the command accepted its input."""


def accept(cfg, resume=False, console=None, command=None):
    raise Accepted(cfg.run_name)


def make_attempt(rng: random.Random, keys: list[str], checkpoint: Path) -> dict[str, Any]:
    kind = rng.choice(["override", "override", "env", "preset", "train-arg", "sample-arg", "eval-arg"])
    env: dict[str, str] = {}
    files: dict[str, bytes | None] = {}
    if kind == "override":
        key = rng.choice([*keys, "bogus", "train.bogus", "train", "model", "loss.weight_c.x", "", "."])
        args = ["train", "tiny.toml", f"{key}={rng.choice(HOSTILE_VALUES)}"]
    elif kind == "env":
        name = rng.choice(
            ["ZOO_" + k.upper().replace(".", "__") for k in keys] + ["ZOO_FOO", "ZOO_STEPS", "ZOO_"]
        )
        env[name] = rng.choice(HOSTILE_VALUES)
        args = ["train", "tiny.toml"]
    elif kind == "preset":
        body = rng.choice(TOML_BODIES)
        choice = rng.choice(["text", "latin1", "folder"])
        files["p.toml"] = (
            None if choice == "folder" else body.encode() + (b"# caf\xe9\n" if choice == "latin1" else b"")
        )
        args = ["train", "p.toml"]
    elif kind == "train-arg":
        flag = rng.choice(
            ["--steps", "--batch-size", "--seed", "--ratio", "--threads", "--device", "--nproc"]
        )
        args = ["train", "tiny.toml", flag, rng.choice(HOSTILE_ARGS)]
    else:
        command = kind.split("-")[0]
        flags = ["--seed", "--device", "--threads", "--n"]
        flags += ["--nfe", "--guidance", "--class", "--solver"] if command == "sample" else ["--fid-n"]
        args = [command, str(checkpoint), rng.choice(flags), rng.choice(HOSTILE_ARGS)]
    return {
        "kind": kind,
        "args": [*args, "--run-name", "f"] if args[0] == "train" else args,
        "env": env,
        "files": files,
    }


def classify(result, wrote: list[str]) -> str:
    output = result.output
    if isinstance(result.exception, Accepted) or result.exit_code == 0:
        return "accepted"
    if result.exit_code == 2 and "Traceback" not in output and not wrote:
        if output.startswith("error: ") and output.count("\n") == 1:
            return "refused (one line)"
        if output.startswith("Usage: "):
            return "refused (typer usage)"
    return "FAILURE"


def snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def run_attempt(attempt: dict[str, Any], folder: Path) -> dict[str, Any]:
    for name, data in attempt["files"].items():
        if data is None:
            (folder / name).mkdir()
        else:
            (folder / name).write_bytes(data)
    before = snapshot(folder)
    result = CliRunner().invoke(app, attempt["args"], env=attempt["env"])
    wrote = sorted(snapshot(folder) - before)
    if attempt["args"][0] != "train":  # sample and eval write their outputs beside the checkpoint
        wrote = [w for w in wrote if not w.startswith("outputs")]
    outcome = classify(result, wrote)
    for name in attempt["files"]:
        shutil.rmtree(folder / name, ignore_errors=True) if (folder / name).is_dir() else (
            folder / name
        ).unlink()
    first = result.output.strip().splitlines()[:1]
    exception = type(result.exception).__name__ if result.exception else None
    return {
        **attempt,
        "files": list(attempt["files"]),
        "outcome": outcome,
        "exit": result.exit_code,
        "first_line": first[0][:200] if first else "",
        "exception": exception,
        "wrote": wrote[:5],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attempts", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("fuzz_configs.json"))
    args = parser.parse_args()
    out = args.out.absolute()
    torch.set_num_threads(args.threads)
    for name in [k for k in os.environ if k.startswith("ZOO_")]:
        del os.environ[name]
    print(f"fuzz_configs: attempts={args.attempts} seed={args.seed} threads={args.threads}", flush=True)
    start = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="zoo-fuzz-"))
    os.chdir(folder)
    (folder / "tiny.toml").write_text(config_to_toml(load_config("moons", TINY)))
    made = CliRunner().invoke(app, ["train", "tiny.toml", "--run-name", "ckpt"])
    assert made.exit_code == 0, made.output
    checkpoint = folder / "outputs" / "ckpt" / "last.pt"
    trainer.train_run = accept  # from here on a valid `zoo train` stops where training would start
    rng = random.Random(args.seed)
    keys = schema_keys()
    records = []
    for k in range(args.attempts):
        records.append(run_attempt(make_attempt(rng, keys, checkpoint), folder))
        shutil.rmtree(folder / "outputs" / "f", ignore_errors=True)
        if records[-1]["outcome"] == "FAILURE":
            print(f"  FAILURE {records[-1]['args']} env={records[-1]['env']}: {records[-1]['first_line']}")
        if (k + 1) % 50 == 0:
            print(f"  {k + 1}/{args.attempts} attempts, {time.perf_counter() - start:.0f} s", flush=True)
    counts = Counter(r["outcome"] for r in records)
    failures = counts["FAILURE"]
    print(f"attempts {len(records)}, passed {len(records) - failures}, failures {failures}")
    for outcome, count in sorted(counts.items()):
        print(f"  {outcome}: {count}")
    print(f"{time.perf_counter() - start:.0f} s")
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"attempts": len(records), "failures": failures, "outcomes": counts, "seed": args.seed}
    out.write_text(json.dumps({"summary": summary, "records": records}, indent=1))
    print(f"wrote {out}")
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
