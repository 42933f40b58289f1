"""A long evaluation keeps the heartbeat fresh (phase "eval"), and under data parallelism the
other ranks wait for rank 0's evaluation at a barrier of their own, not in the next all-reduce.

Truth for the first: heartbeat.json as read from disk while the samplers run.  For the second:
a process group whose timeout is shorter than rank 0's evaluation; a rank waiting for it in a
training collective fails with a gloo timeout.
"""

import json
import time
from pathlib import Path

import pytest
from gloo_ranks import join, run_ranks
from tiny_runs import TINY_RUN

from zoo import distributed, evaluation
from zoo.config.loading import load_config
from zoo.training import progress, trainer


def tiny_config(tmp_path: Path, *extra: str):
    return load_config(
        "moons",
        [*TINY_RUN, "tracking.enabled=false", "run_name=hb", f"output_dir={tmp_path / 'outputs'}", *extra],
    )


def test_the_heartbeat_stays_fresh_and_says_eval_while_evaluating(tmp_path, monkeypatch):
    # 4 sampled batches per method: each must refresh the heartbeat (the interval is 0 here).
    cfg = tiny_config(tmp_path, "train.steps=10", "train.eval_every=5", "eval.batch_size=50")
    monkeypatch.setattr(progress, "PHASE_HEARTBEAT_EVERY_S", 0.0)
    heartbeat_file = tmp_path / "outputs" / "hb" / "heartbeat.json"
    seen: list[tuple[str, str | None, float]] = []
    sample = evaluation.sample_meanflow

    def watched_sample(*args, **kwargs):
        beat = json.loads(heartbeat_file.read_text())
        seen.append((beat["status"], beat.get("phase"), beat["updated"]))
        time.sleep(0.02)  # a batch takes time: a refreshed heartbeat is visibly newer
        return sample(*args, **kwargs)

    monkeypatch.setattr(evaluation, "sample_meanflow", watched_sample)
    trainer.train_run(cfg)

    assert len(seen) >= 8  # the periodic evaluation at step 5 and the final one
    assert all(status == "running" and phase == "eval" for status, phase, _ in seen)
    updates = [updated for _, _, updated in seen]
    assert all(later > earlier for earlier, later in zip(updates, updates[1:], strict=False)), updates
    final = json.loads(heartbeat_file.read_text())
    assert final["status"] == "finished" and final["step"] == 10


def test_training_goes_back_to_phase_train_after_a_periodic_evaluation(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "train.steps=10", "train.eval_every=5")
    phases: list[str] = []
    write = trainer.RunDir.write_heartbeat

    def recording_write(self, **fields):
        if "phase" in fields:
            phases.append(fields["phase"])
        return write(self, **fields)

    monkeypatch.setattr(trainer.RunDir, "write_heartbeat", recording_write)
    trainer.train_run(cfg)
    compact = [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p]
    # ... and a finished run's heartbeat says it is done, not "eval".
    assert compact == ["train", "eval", "train", "eval", "done"], phases


# The process group's timeout, and how long rank 0's periodic evaluation takes: longer, by more
# than the ranks' start-up skew (the timeout also bounds the first collectives).
COLLECTIVE_TIMEOUT_S = 2.0
SLOW_EVAL_S = 5.0


def rank_main(rank: int, world: int, port: int, output_dir: Path) -> None:
    join(rank, world, port, timeout_s=COLLECTIVE_TIMEOUT_S)
    evaluate = trainer.run_evaluation

    def slow_evaluation(state, run, final, progress):
        if not final:
            time.sleep(SLOW_EVAL_S)
        return evaluate(state, run, final, progress)

    trainer.run_evaluation = slow_evaluation  # this process's own copy of the module (fork)
    cfg = tiny_config(output_dir, "train.steps=4", "train.eval_every=2")
    try:
        trainer.train_run(cfg)
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_other_ranks_wait_for_rank_0s_evaluation_at_a_barrier(tmp_path):
    run_ranks(rank_main, 2, tmp_path)
    run = tmp_path / "outputs" / "hb"
    assert json.loads((run / "heartbeat.json").read_text())["status"] == "finished"
    evals = [
        json.loads(line)["step"]
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if "eval/" in line
    ]
    assert evals == [2, 4]  # the periodic evaluation at step 2, then the final one
