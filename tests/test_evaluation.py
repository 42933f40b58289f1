"""Evaluation: repeatable within its error bars, sensitive to quality, honest about its floor."""

import math

import pytest
import torch

from zoo.config import load_config
from zoo.evaluation import Method, default_methods, evaluate, headline_method, pick_method
from zoo.training.trainer import build_state, train_step


def trained_moons(steps: int):
    # weight_p = 1 (the paper's adaptive weight), not the moons preset's 0: these tests are about
    # the evaluation, and p = 1 learns a usable one-step map within 150 steps, while p = 0 passes
    # through an unstable phase first (EMA 1-step energy distance 0.052 at step 150, about the
    # untrained model's 0.053; 0.18 at step 300, 0.01 by step 800;
    # EXPERIMENT_LOG "2-D presets train with loss.weight_p = 0").
    cfg = load_config(
        "moons",
        [
            "run_name=e",
            "model.hidden=64",
            "model.depth=2",
            "train.batch_size=128",
            "loss.jvp=fused",
            "loss.weight_p=1.0",
        ],
    )
    state = build_state(cfg, torch.device("cpu"))
    for _ in range(steps):
        train_step(state)
    return cfg, state


def test_two_evaluations_agree_within_error_bars_and_training_helps():
    cfg, state = trained_moons(150)
    eval_cfg = cfg.eval.model_copy(update={"n_samples": 1500})
    methods = [Method("meanflow", 1, 1)]
    first = evaluate(
        state.ema.model, state.source, eval_cfg, meanflow=True, seed=0, methods=methods, with_floor=False
    ).rows[0]
    second = evaluate(state.ema.model, state.source, eval_cfg, meanflow=True, seed=1, methods=methods).rows[0]
    combined = math.hypot(first.stderr, second.stderr)
    assert abs(first.energy_distance - second.energy_distance) < 3 * combined
    # The error bars are informative, not vacuous: the untrained model (its zero-initialised
    # output makes its samples pure noise) is several of them away.
    untrained_cfg, untrained = trained_moons(0)
    worse = evaluate(
        untrained.ema.model, untrained.source, eval_cfg, meanflow=True, seed=0, methods=methods
    ).rows[0]
    assert worse.energy_distance - first.energy_distance > 3 * math.hypot(worse.stderr, first.stderr)


def test_default_methods_skip_nfe_a_solver_cannot_take():
    cfg = load_config("moons", ['eval.solvers=["euler", "heun", "rk4"]', "eval.solver_nfe=[2, 8, 50]"])
    methods = default_methods(cfg.eval, meanflow=True)
    labels = {(m.kind, m.steps, m.nfe) for m in methods}
    assert {("meanflow", 1, 1), ("meanflow", 2, 2), ("meanflow", 4, 4)} <= labels
    assert ("heun", 25, 50) in labels and ("rk4", 2, 8) in labels
    assert not any(kind == "rk4" and nfe in (2, 50) for kind, _, nfe in labels)
    assert not any(
        kind == "meanflow"
        for kind, *_ in {(m.kind, m.steps, m.nfe) for m in default_methods(cfg.eval, meanflow=False)}
    )


def test_method_labels_count_steps_in_words():
    assert Method("heun", 1, 2).label == "Heun 1 step"
    assert Method("euler", 8, 8).label == "Euler 8 steps"
    assert Method("meanflow", 1, 1).label == "MeanFlow 1-step"


def test_headline_method_follows_the_run_and_rounds_up_to_whole_solver_steps():
    cfg = load_config("moons", ['eval.solvers=["rk4", "euler"]', "eval.solver_nfe=[2, 8, 50]"])
    assert headline_method(cfg.eval, meanflow=True) == Method("meanflow", 1, 1)
    # flow matching: the run's first solver at its largest NFE; 50 is no multiple of rk4's 4 calls
    assert headline_method(cfg.eval, meanflow=False) == Method("rk4", 13, 52)
    assert headline_method(cfg.eval, meanflow=True, solver="heun") == Method("heun", 25, 50)
    assert headline_method(cfg.eval, meanflow=True, nfe=2) == Method("meanflow", 2, 2)
    # an NFE the user typed is taken as given, never rounded
    with pytest.raises(ValueError, match="multiple of 4; got 50"):
        headline_method(cfg.eval, meanflow=False, nfe=50)
    with pytest.raises(ValueError, match="need a MeanFlow model"):
        headline_method(cfg.eval, meanflow=False, solver="meanflow")


def test_pick_method_defaults_are_the_callers():
    assert pick_method(False, None, None, "heun", 7) == Method("heun", 4, 8)
    assert pick_method(True, "meanflow", 4, "euler", 50) == Method("meanflow", 4, 4)
    assert pick_method(True, "midpoint", None, "euler", 50) == Method("midpoint", 25, 50)
