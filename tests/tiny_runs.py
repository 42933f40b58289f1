"""Overrides that make a `zoo train moons` run small enough for a test (tiny MLP, small eval)."""

TINY_RUN = [
    "model.hidden=64",
    "model.depth=2",
    "train.batch_size=64",
    "train.log_every=5",
    "train.save_every=10",
    "eval.n_samples=200",
    "eval.batch_size=200",
    "eval.meanflow_steps=[1]",
    'eval.solvers=["euler"]',
    "eval.solver_nfe=[2]",
    "loss.jvp=nograd",
    "experiment_log=",
    "device=cpu",
]
