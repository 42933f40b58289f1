"""Try to brick `zoo train` runs as an operator might, and count what survives.

Every attempt trains tiny moons runs through the real CLI in subprocesses and then checks what
a user would: the run resumes, its final state equals an uninterrupted run's (max |difference|
over every tensor of the final last.pt), errors are one line, nothing half-written is left.

    kill-random      SIGKILL at a random instant (during start-up, building or training), then
                     `zoo ckpts` must list a run whose heartbeat says running as dead, and the run
                     resumes (--resume; --restart or a plain start when it had saved nothing)
    kill-<phase>     os._exit inside one phase of a checkpoint write (writing, written, renamed,
                     checksum written, done), then --resume
    SIGTERM, SIGHUP  mid-run: exit 128+signal, heartbeat "interrupted", then --resume
    disk-full        ENOSPC while a checkpoint is written: one line, no partial file, heartbeat
                     "failed" with the cause, then --resume
    corrupt-*        flipped bytes without a sidecar, garbage heartbeat/eval.json, non-UTF-8
                     metrics: one line or a marked skip from --resume, zoo ckpts and zoo clean
    diverge          an inf gradient at step 13: stops before that update and any save, one line,
                     the last good checkpoint (step 10) intact
    env-output-dir   a run started and resumed with ZOO_OUTPUT_DIR set, killed in between
    concurrent       two `zoo train --run-name X` started together (their build slowed by 5 s, as
                     a feature network's training would): exactly one trains, the other exits 2
                     with one line before the first has finished building; then a third start and
                     a --resume together, while the first holds the run: both exit 2 with one line;
                     the first's final state equals the reference

The faults inside a write are injected by running the CLI through this script's `child` mode,
which wraps os.fsync/os.replace/open for the run's last.pt before calling zoo.

    python scripts/hostile_runs.py --repeats 2 --kills 8 --out hostile
    (writes hostile/results.json and hostile/log.txt)
"""

import argparse
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 30
TINY = [
    "model.hidden=32",
    "model.depth=2",
    "train.batch_size=32",
    "train.log_every=1",
    "train.save_every=5",
    "eval.n_samples=100",
    "eval.batch_size=100",
    "eval.meanflow_steps=[1]",
    'eval.solvers=["euler"]',
    "eval.solver_nfe=[2]",
    "loss.jvp=nograd",
    "tracking.enabled=false",
    "experiment_log=",
    "device=cpu",
    "--threads",
    "1",
]
PHASES = ("writing", "written", "renamed", "checksum written", "done")
KILLED = 137
# The concurrent scenario's build delay, and how long a refused start may take on top of it
# before the refusal counts as late (a loaded machine starts a Python process with torch slowly).
BUILD_DELAY_S = 5
STARTUP_ALLOWANCE_S = 20


# ----------------------------------------------------------------------------- the child mode


def install_fault(fault: str, at_save: int) -> None:
    """Make the `at_save`-th write of last.pt fail at `fault` (a phase: os._exit as SIGKILL would;
    "enospc": a full disk); "diverge": the gradient after step `at_save` non-finite."""
    import builtins

    real_fsync, real_replace, real_open = os.fsync, os.replace, builtins.open
    seen = {"tmp": 0, "pt": 0, "sha": 0}

    def fd_name(fd: int) -> str:
        return os.readlink(f"/proc/self/fd/{fd}")

    def fsync(fd: int) -> None:
        if fault == "writing" and ".last.pt.tmp-" in fd_name(fd):
            seen["tmp"] += 1
            if seen["tmp"] == at_save:
                os.ftruncate(fd, os.fstat(fd).st_size // 2)
                os._exit(KILLED)
        real_fsync(fd)

    def replace(src, dst) -> None:
        name = Path(dst).name
        key = "pt" if name == "last.pt" else "sha" if name == "last.pt.sha256" else None
        if key is not None:
            seen[key] += 1
        due = key is not None and seen[key] == at_save
        if due and (fault, key) in (("written", "pt"), ("checksum written", "sha")):
            os._exit(KILLED)
        real_replace(src, dst)
        if due and (fault, key) in (("renamed", "pt"), ("done", "sha")):
            os._exit(KILLED)

    def open_(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if fault == "enospc" and ".last.pt.tmp-" in str(file):
            seen["tmp"] += 1
            if seen["tmp"] == at_save:
                real_write = handle.write

                def write(data):
                    real_write(data[: len(data) // 2])
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

                handle.write = write
        return handle

    os.fsync, os.replace = fsync, replace
    if fault == "enospc":
        builtins.open = open_
    if fault == "diverge":
        poison_gradient_after(at_save)
    if fault == "slow-build":
        slow_build(at_save)


def slow_build(seconds: int) -> None:
    """Building the run's state takes `seconds` longer, as training a feature network would."""
    from zoo.training import trainer

    real = trainer.build_state

    def build_state(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)

    trainer.build_state = build_state


def poison_gradient_after(step: int) -> None:
    """An inf in the gradient of the step after `step`, as a learning rate far too large gives."""
    from zoo.training import trainer

    real = trainer.micro_batch_backward

    def backward(state):
        metrics = real(state)
        if state.step == step:
            next(state.model.parameters()).grad.view(-1)[0] = float("inf")
        return metrics

    trainer.micro_batch_backward = backward


def child(argv: list[str]) -> None:
    fault, at_save, zoo_args = argv[0], int(argv[1]), argv[3:]
    install_fault(fault, at_save)
    from zoo_cli.main import app

    app(args=zoo_args, prog_name="zoo")


# ----------------------------------------------------------------------------- the parent


class Hostile:
    def __init__(self, out: Path, seed: int) -> None:
        self.out = out
        self.rng = random.Random(seed)
        self.results: list[dict] = []
        self.log = (out / "log.txt").open("a")
        self.reference: dict | None = None

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def zoo(self, args: list[str], fault: tuple[str, int] | None = None, env: dict | None = None, **kw):
        prefix = [sys.executable, "-m", "zoo_cli.main"]
        if fault is not None:
            prefix = [sys.executable, __file__, "child", fault[0], str(fault[1]), "--"]
        environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
        return subprocess.Popen(
            prefix + args,
            cwd=self.out,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # As from a terminal: under `nohup` this script's SIGHUP is ignored, and an ignored
            # signal stays ignored in zoo train (zoo.interrupts), so SIGHUP would test nothing.
            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
            **kw,
        )

    def train(self, name: str, *extra: str, fault=None, env=None, outputs: str | None = None):
        where = [] if outputs is None else [f"output_dir={outputs}"]
        return self.zoo(["train", "moons", *TINY, *where, "--run-name", name, *extra], fault, env)

    def finish(self, process, timeout: float = 600) -> tuple[int, str]:
        _, err = process.communicate(timeout=timeout)
        return process.returncode, err

    def record(self, kind: str, ok: bool, detail: str, diff: float | None = None, seconds: float = 0) -> None:
        self.results.append(
            {"kind": kind, "passed": ok, "detail": detail, "max_abs_diff": diff, "s": seconds}
        )
        shown = "" if diff is None else f" max|diff| {diff:.3g}"
        self.say(f"{'PASS' if ok else 'FAIL'} {kind}{shown} ({seconds:.0f} s) {detail}")

    # ------------------------------------------------------------------ checks

    def final_state(self, run: Path) -> dict:
        import torch

        from zoo.checkpoints import load_checkpoint

        payload = load_checkpoint(run / "last.pt")
        tensors = {}

        def walk(value, key):
            if isinstance(value, torch.Tensor):
                tensors[key] = value
            elif isinstance(value, dict):
                for k, v in value.items():
                    walk(v, f"{key}/{k}")
            elif isinstance(value, list):
                for i, v in enumerate(value):
                    walk(v, f"{key}/{i}")

        for key in ("model", "ema", "optimizer", "rng", "data_state"):
            walk(payload[key], key)
        return tensors

    def difference(self, run: Path) -> float:
        got = self.final_state(run)
        if set(got) != set(self.reference):
            return float("inf")
        return max(
            (self.reference[k].double() - got[k].double()).abs().max().item() if got[k].numel() else 0.0
            for k in got
        )

    def resume_and_compare(
        self, kind: str, name: str, started: float, outputs: str | None = None, env=None, note: str = ""
    ):
        rc, err = self.finish(self.train(name, "--resume", "--steps", str(STEPS), env=env, outputs=outputs))
        run = Path(outputs or self.out / "outputs") / name
        if rc != 0:
            self.record(kind, False, f"resume rc {rc}: {last_line(err)}", seconds=time.time() - started)
            return
        diff = self.difference(run)
        self.record(kind, diff == 0.0, f"resumed {note}".strip(), diff, time.time() - started)

    def heartbeat(self, run: Path) -> dict:
        return json.loads((run / "heartbeat.json").read_text())

    def wait_for_step(self, run: Path, step: int, process, timeout: float = 300) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if self.heartbeat(run).get("step", 0) >= step:
                    return True
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            time.sleep(0.05)
        return False

    # ------------------------------------------------------------------ scenarios

    def make_reference(self) -> None:
        started = time.time()
        rc, err = self.finish(self.train("reference", "--steps", str(STEPS)))
        if rc != 0:
            raise SystemExit(f"the uninterrupted reference run failed: {err}")
        self.reference = self.final_state(self.out / "outputs" / "reference")
        self.say(f"reference run: {STEPS} steps in {time.time() - started:.0f} s")

    def kill_random(self, index: int) -> None:
        name, started = f"kill-random-{index}", time.time()
        run = self.out / "outputs" / name
        process = self.train(name, "--steps", str(STEPS))
        if self.rng.random() < 0.25:  # during start-up or building: the lock held, no folder yet
            time.sleep(self.rng.uniform(0, 8))
        else:
            self.wait_for_step(run, self.rng.randint(1, STEPS - 5), process)
            time.sleep(self.rng.uniform(0, 0.5))
        process.send_signal(signal.SIGKILL)
        self.finish(process)
        when = (
            f"killed at step {self.heartbeat(run).get('step')}" if (run / "heartbeat.json").exists() else ""
        )
        listed = self.listed_state(name)
        if (run / "heartbeat.json").exists() and self.heartbeat(run).get("status") == "running":
            if listed != "dead":
                self.record("kill-random", False, f"{when}: zoo ckpts says {listed}, not dead")
                return
        if not (run / "last.pt").exists():  # killed before the first checkpoint: start it again
            again = ["--restart"] if run.exists() else []
            rc, err = self.finish(self.train(name, *again, "--steps", str(STEPS)))
            diff = self.difference(run) if rc == 0 else None
            how = f"{when or 'killed before the folder existed'}: {again or 'a plain start'}"
            self.record("kill-random", diff == 0.0, f"{how}, rc {rc}", diff, time.time() - started)
            return
        self.resume_and_compare("kill-random", name, started, note=f"{when}, ckpts said {listed}")

    def listed_state(self, name: str, outputs: Path | None = None) -> str | None:
        """The state `zoo ckpts` gives the run."""
        folder = outputs or self.out / "outputs"
        rc, out = self.finish_out(self.zoo(["ckpts", "--local", "--outputs", str(folder), "--json"]))
        if rc != 0:
            return f"rc {rc}"
        return next((info["state"] for info in json.loads(out) if info["run"] == name), None)

    def finish_out(self, process, timeout: float = 600) -> tuple[int, str]:
        out, _ = process.communicate(timeout=timeout)
        return process.returncode, out

    def concurrent(self, index: int) -> None:
        """Two starts of one run at once, then a third and a --resume while the winner trains."""
        name, started = f"concurrent-{index}", time.time()
        run = self.out / "outputs" / name
        slow = ("slow-build", BUILD_DELAY_S)
        first, second = (self.train(name, "--steps", str(STEPS), fault=slow) for _ in range(2))
        both = {first: "first", second: "second"}
        # Time each exit, and when the winner has finished building (its first heartbeat).
        ended: dict = {}
        built_at = None
        while len(ended) < 2:
            for process in both:
                if process not in ended and process.poll() is not None:
                    ended[process] = time.monotonic()
                    if len(ended) == 1 and process.returncode != 0:
                        # While the winner holds the run: a third start and a --resume are refused.
                        late = self.refused_at_once(name, slow)
                    elif len(ended) == 1:
                        late = (False, f"a start ended first with rc {process.returncode}")
            if built_at is None and (run / "heartbeat.json").exists():
                built_at = time.monotonic()
            time.sleep(0.02)
        results = {process: self.finish(process) for process in both}
        winners = [p for p, (rc, _) in results.items() if rc == 0]
        losers = [p for p, (rc, _) in results.items() if rc != 0]
        if len(winners) != 1 or len(losers) != 1:
            rcs = [rc for rc, _ in results.values()]
            self.record("concurrent", False, f"exit codes {rcs}", seconds=time.time() - started)
            return
        [loser] = losers
        rc, err = results[loser]
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        one_line = rc == 2 and len(errors) == 1 and "is being trained by process" in errors[0]
        one_line = one_line and "Traceback" not in err
        early = built_at is not None and ended[loser] < built_at
        diff = self.difference(run)
        ok = one_line and early and late[0] and diff == 0.0
        detail = (
            f"refused the {both[loser]} start (rc {rc}, {len(errors)} error line(s)) "
            f"{built_at - ended[loser] if built_at else float('nan'):.1f} s before the winner had built; "
            f"then a start and a --resume: {late[1]}"
        )
        self.record("concurrent", ok, detail, diff, time.time() - started)

    def refused_at_once(self, name: str, slow) -> tuple[bool, str]:
        """A fresh start and a --resume of a run another process holds, started together: each
        exits 2 with one line, sooner than its own (slowed) build could have ended."""
        began = time.monotonic()
        processes = [
            self.train(name, *extra, "--steps", str(STEPS), fault=slow) for extra in ([], ["--resume"])
        ]
        outcomes = []
        for process in processes:
            rc, err = self.finish(process)
            took = time.monotonic() - began
            errors = [line for line in err.splitlines() if line.startswith("error:")]
            fine = rc == 2 and len(errors) == 1 and "is being trained by process" in errors[0]
            fine = fine and took < BUILD_DELAY_S + STARTUP_ALLOWANCE_S
            outcomes.append((fine, f"rc {rc} within {took:.1f} s" + ("" if fine else f": {last_line(err)}")))
        return all(ok for ok, _ in outcomes), ", ".join(text for _, text in outcomes)

    def kill_in_phase(self, phase: str) -> None:
        name, started = f"kill-{phase.replace(' ', '-')}", time.time()
        rc, _ = self.finish(self.train(name, "--steps", str(STEPS), fault=(phase, 3)))
        run = self.out / "outputs" / name
        if rc != KILLED:
            self.record(
                f"kill-{phase}", False, f"the fault did not fire (rc {rc})", seconds=time.time() - started
            )
            return
        from zoo.checkpoints import load_checkpoint

        before = time.monotonic()
        step = load_checkpoint(run / "last.pt")["step"]
        waited = time.monotonic() - before
        expected = 10 if phase in ("writing", "written") else 15
        if step != expected or waited > 5:
            self.record(
                f"kill-{phase}", False, f"last.pt at step {step} (expected {expected}), load {waited:.1f} s"
            )
            return
        self.resume_and_compare(f"kill-{phase}", name, started)

    def signal_mid_run(self, sig: signal.Signals, index: int) -> None:
        name, started = f"signal-{sig.name}-{index}", time.time()
        run = self.out / "outputs" / name
        process = self.train(name, "--steps", str(STEPS))
        self.wait_for_step(run, self.rng.randint(3, STEPS - 5), process)
        process.send_signal(sig)
        rc, err = self.finish(process)
        beat = self.heartbeat(run)
        said = "resume with `zoo train moons --run-name" in " ".join(err.split())
        if (
            rc != 128 + sig
            or beat["status"] != "interrupted"
            or beat.get("checkpoint_step") != beat["step"]
            or not said
        ):
            detail = f"rc {rc}, heartbeat {beat['status']} at {beat['step']}: {last_line(err)}"
            self.record(sig.name, False, detail, seconds=time.time() - started)
            return
        self.resume_and_compare(sig.name, name, started)

    def disk_full(self) -> None:
        name, started = "disk-full", time.time()
        run = self.out / "outputs" / name
        rc, err = self.finish(self.train(name, "--steps", str(STEPS), fault=("enospc", 3)))
        from zoo.checkpoints import load_checkpoint

        errors = [line for line in err.splitlines() if line.startswith("error:")]
        beat = self.heartbeat(run)
        leftovers = list(run.glob(".*.tmp-*"))
        ok = (
            rc == 1
            and len(errors) == 1
            and "No space left on device" in errors[0]
            and "Traceback" not in err
            and beat["status"] == "failed"
            and "No space left" in beat.get("error", "")
            and not leftovers
            and load_checkpoint(run / "last.pt")["step"] == 10
        )
        if not ok:
            self.record("disk-full", False, f"rc {rc}, {errors}, heartbeat {beat.get('status')}, {leftovers}")
            return
        self.resume_and_compare("disk-full", name, started)

    def diverge(self) -> None:
        name, started = "diverge", time.time()
        run = self.out / "outputs" / name
        rc, err = self.finish(self.train(name, "--steps", str(STEPS), fault=("diverge", 12)))
        from zoo.checkpoints import load_checkpoint

        errors = [line for line in err.splitlines() if line.startswith("error:")]
        beat = self.heartbeat(run)
        payload = load_checkpoint(run / "last.pt")
        intact = payload["step"] == 10 and all(
            t.isfinite().all() for t in [*payload["model"].values(), *payload["ema"].values()]
        )
        ok = rc == 1 and len(errors) == 1 and "diverged at step 13" in errors[0] and "Traceback" not in err
        ok = ok and beat["status"] == "failed" and intact
        self.record("diverge", ok, errors[0] if errors else last_line(err), seconds=time.time() - started)

    def corrupt(self) -> None:
        import shutil

        source = self.out / "outputs" / "reference"
        cases = {
            "corrupt-flip-no-sidecar": self.flip_without_sidecar,
            "corrupt-heartbeat": lambda run: (run / "heartbeat.json").write_bytes(b"[1, 2]"),
            "corrupt-empty-heartbeat": lambda run: (run / "heartbeat.json").write_bytes(b""),
            "corrupt-eval-json": lambda run: (run / "eval.json").write_bytes(b"\x00garbage"),
            "corrupt-metrics-utf8": lambda run: (run / "metrics.jsonl").open("ab").write(b"\xff\xfe\n"),
        }
        for kind, damage in cases.items():
            started = time.time()
            # A copy under its own outputs folder, not another name: a run resumes only from its own
            # checkpoints (zoo.runs.check_checkpoint_owner).
            outputs = self.out / kind / "outputs"
            run = outputs / "reference"
            shutil.copytree(source, run)
            damage(run)
            outcomes = []
            for args in (
                ["ckpts", "--local", "--outputs", str(outputs)],
                ["clean", "reference", "--outputs", str(outputs), "--yes", "--live-window", "1s"],
                ["train", "moons", f"output_dir={outputs}", "--run-name", "reference", "--resume"]
                + ["--steps", str(STEPS + 2), "--threads", "1"],
            ):
                rc, err = self.finish(self.zoo(args))
                errors = [line for line in err.splitlines() if line.startswith("error:")]
                outcomes.append((args[0], rc, "Traceback" in err, errors))
            tracebacks = [o for o in outcomes if o[2]]
            resume = outcomes[2]
            if kind == "corrupt-flip-no-sidecar":
                resume_ok = resume[1] == 1 and len(resume[3]) == 1 and "damaged" in resume[3][0]
            else:
                resume_ok = resume[1] == 0
            ok = not tracebacks and outcomes[0][1] == 0 and outcomes[1][1] == 0 and resume_ok
            detail = str([(o[0], o[1], *o[3][:1]) for o in outcomes])
            self.record(kind, ok, detail, seconds=time.time() - started)

    def flip_without_sidecar(self, run: Path) -> None:
        data = bytearray((run / "last.pt").read_bytes())
        data[len(data) // 2] ^= 0x10
        (run / "last.pt").write_bytes(bytes(data))
        (run / "last.pt.sha256").unlink()

    def env_output_dir(self) -> None:
        name, started = "env-output", time.time()
        alt = str(self.out / "alt")
        env = {"ZOO_OUTPUT_DIR": alt}
        process = self.train(name, "--steps", str(STEPS), env=env)
        self.wait_for_step(Path(alt) / name, 12, process)
        process.send_signal(signal.SIGKILL)
        self.finish(process)
        rc, err = self.finish(self.train(name, "--resume", "--steps", str(STEPS), env=env))
        if rc != 0:
            self.record(
                "env-output-dir", False, f"resume rc {rc}: {last_line(err)}", seconds=time.time() - started
            )
            return
        diff = self.difference(Path(alt) / name)
        self.record("env-output-dir", diff == 0.0, "resumed with ZOO_OUTPUT_DIR", diff, time.time() - started)


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="signals and concurrent starts, each this many times"
    )
    parser.add_argument("--kills", type=int, default=4, help="SIGKILLs at random instants")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("hostile-runs"))
    parser.add_argument(
        "--only",
        nargs="*",
        help="scenario groups: kill-random phases signals disk corrupt diverge env concurrent",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if any(args.out.joinpath("outputs").glob("*")):
        raise SystemExit(f"{args.out}/outputs is not empty: give a new --out")
    hostile = Hostile(args.out.resolve(), args.seed)
    groups = args.only or [
        "kill-random",
        "phases",
        "signals",
        "disk",
        "corrupt",
        "diverge",
        "env",
        "concurrent",
    ]
    hostile.say(
        f"hostile runs: {groups}, repeats {args.repeats}, seed {args.seed}, {STEPS} steps, out {args.out}"
    )
    started = time.time()
    hostile.make_reference()
    if "kill-random" in groups:
        for index in range(args.kills):
            hostile.kill_random(index)
    for index in range(args.repeats):
        if "signals" in groups:
            hostile.signal_mid_run(signal.SIGTERM, index)
            hostile.signal_mid_run(signal.SIGHUP, index)
        if "concurrent" in groups:
            hostile.concurrent(index)
    if "phases" in groups:
        for phase in PHASES:
            hostile.kill_in_phase(phase)
    if "disk" in groups:
        hostile.disk_full()
    if "corrupt" in groups:
        hostile.corrupt()
    if "diverge" in groups:
        hostile.diverge()
    if "env" in groups:
        hostile.env_output_dir()
    results = hostile.results
    diffs = [r["max_abs_diff"] for r in results if r["max_abs_diff"] is not None]
    summary = {
        "attempts": len(results),
        "passed": sum(r["passed"] for r in results),
        "resumes_compared": len(diffs),
        "max_abs_diff_over_resumes": max(diffs) if diffs else None,
        "seconds": time.time() - started,
    }
    (args.out / "results.json").write_text(json.dumps({"summary": summary, "attempts": results}, indent=2))
    hostile.say(
        f"attempts {summary['attempts']}, passed {summary['passed']}; final state vs the uninterrupted "
        f"run over {len(diffs)} runs (kill/stop + resume, concurrent winner): "
        f"max |diff| {summary['max_abs_diff_over_resumes']}; "
        f"{summary['seconds']:.0f} s"
    )


if __name__ == "__main__":
    main()
