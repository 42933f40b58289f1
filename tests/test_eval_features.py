"""`zoo eval` and training on images score samples in the feature network's space: the floor row
is the real-vs-real score at the same n, two seeds agree within their standard errors, class
fidelity and per-class FD are what the classifier says of the samples, too few samples is refused
before any sampling, and periodic evaluations reach trackio."""

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_eval_compare import LINE_COLOURS, coloured_pixels
from test_remote_fixtures import trackio_metric
from typer.testing import CliRunner

from zoo import evaluation
from zoo.config.schema import DataConfig
from zoo.data import build_data
from zoo.evaluation import FeatureReference
from zoo.inference import load_model
from zoo.metrics import features
from zoo.metrics.feature_metrics import frechet_distance, score_features
from zoo.metrics.features import FeatureNetConfig, load_feature_net
from zoo.solvers.samplers import sample_meanflow
from zoo_cli.main import app

# One module-wide setup trains a small digits feature network, a 20-step class-conditional run
# (evaluated at steps 10 and 20) and evaluates it twice: about 30 s on two idle cores.
pytestmark = pytest.mark.slow

runner = CliRunner()
HELD_OUT = 297  # scikit-learn digits' held-out split: every evaluation below uses all of it
PROJECT = "zoo-eval-features"
CLASS_DIGITS = [
    "model.channels=8",
    "model.channel_mults=[1]",
    "model.attention_res=[]",
    "model.num_groups=4",
    "data.class_conditional=true",
    "train.batch_size=32",
    "train.log_every=5",
    "train.eval_every=10",
    "loss.jvp=nograd",
    f"eval.n_samples={HELD_OUT}",
    f"eval.batch_size={HELD_OUT}",
    "eval.meanflow_steps=[1, 2]",
    'eval.solvers=["euler"]',
    "eval.solver_nfe=[2]",
    "eval.grid_size=16",
    "experiment_log=",
    f"tracking.project={PROJECT}",
    "--steps",
    "20",
    "--device",
    "cpu",
    "--threads",
    "1",
]


def zoo(*args):
    return runner.invoke(app, [str(a) for a in args])


# A digits feature network that trains in seconds (the real one takes a minute): what is tested
# here is how evaluations use a feature network, not the network.
SMALL_NET = FeatureNetConfig(
    widths=(8, 16), hidden=32, epochs=3, batch_size=32, lr=1e-2, dropout=0.0, hflip=False, min_accuracy=0.8
)


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory) -> Iterator[Path]:
    """While the module's runs train and evaluate: SMALL_NET as digits' config, in a cache of
    the module's own (trained once, on first use, by the first command that needs it)."""
    cache = tmp_path_factory.mktemp("zoo-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(features.FEATURE_NET_CONFIGS, "digits", SMALL_NET)
        patch.setenv("ZOO_CACHE_DIR", str(cache))
        yield cache / "feature-nets"


def digits_net(feature_cache: Path) -> features.FeatureNet:
    return load_feature_net("digits", SMALL_NET, train_if_missing=False, cache_dir=feature_cache)


@pytest.fixture(scope="module")
def digits_run(feature_cache, tmp_path_factory) -> Path:
    """A class-conditional MeanFlow U-Net trained 20 steps on digits, evaluated at step 10."""
    root = tmp_path_factory.mktemp("digits-features")
    with pytest.MonkeyPatch.context() as patch:  # the autouse fixture drops ZOO_ settings per test
        patch.setenv("ZOO_CACHE_DIR", str(feature_cache.parent))
        result = zoo("train", "digits", *CLASS_DIGITS, "--run-name", "cd", f"output_dir={root}")
    assert result.exit_code == 0, result.output
    assert (feature_cache / "digits.pt").is_file()  # trained by `zoo train` before its first step
    return root / "cd"


@pytest.fixture(scope="module")
def evaluated(feature_cache, digits_run, tmp_path_factory) -> dict[int, dict]:
    """`zoo eval` of the run with seeds 0 and 1: seed -> its JSON."""
    out = {}
    for seed in (0, 1):
        path = tmp_path_factory.mktemp("eval") / f"e{seed}.json"
        result = zoo("eval", digits_run, "--seed", seed, "--json", path, "--device", "cpu", "--threads", 1)
        assert result.exit_code == 0, result.output
        out[seed] = json.loads(path.read_text())
        out[seed]["quality_png"] = path.with_name(f"e{seed}_quality.png")
    return out


def test_floor_row_is_the_score_of_the_training_split_against_the_held_out_split(
    feature_cache, digits_run, evaluated
):
    cfg = load_model(digits_run / "last.pt", torch.device("cpu")).cfg
    source = build_data(cfg.data, "cpu", cfg.seed, batch_size=HELD_OUT)
    net = digits_net(feature_cache)
    held_out, training = source.held_out(HELD_OUT), source.reference(HELD_OUT)
    truth = score_features(net.features(held_out), net.features(training))
    floor = evaluated[0]["noise_floor"]
    assert evaluated[0]["n_samples"] == HELD_OUT
    for name, estimate in truth.items():
        assert floor["scores"][name]["value"] == pytest.approx(estimate.value, rel=1e-6, abs=1e-9), name
        assert floor["scores"][name]["stderr"] == pytest.approx(estimate.stderr, rel=1e-6, abs=1e-9), name
        assert floor["scores"][name]["n"] == estimate.n
    # the floor is the same for every seed: it does not depend on the model's noise
    assert evaluated[1]["noise_floor"] == floor


def test_the_floor_row_has_the_class_fidelity_of_the_held_out_images(feature_cache, digits_run, evaluated):
    """What real images score, beside the samples' class fidelity: the feature net's accuracy on
    the held-out images the samples are compared with (all 297 test digits: its test accuracy)."""
    cfg = load_model(digits_run / "last.pt", torch.device("cpu")).cfg
    held_out, labels = build_data(cfg.data, "cpu", cfg.seed, batch_size=HELD_OUT).held_out_labeled(HELD_OUT)
    net = digits_net(feature_cache)
    accuracy = (net.logits(held_out).argmax(1) == labels).double().mean().item()
    floor = evaluated[0]["noise_floor"]["class_fidelity"]
    assert floor["value"] == pytest.approx(accuracy, abs=1e-12) == net.test_accuracy
    assert floor["n"] == HELD_OUT and floor["stderr"] == pytest.approx(
        math.sqrt(accuracy * (1 - accuracy) / HELD_OUT)
    )
    assert evaluated[1]["noise_floor"]["class_fidelity"] == floor


def test_quality_vs_nfe_plots_fd_with_one_line_per_sampler_family(evaluated):
    """MeanFlow (1, 2 steps) and Euler (2 NFE): two lines, in matplotlib's first two colours."""
    drawn = [coloured_pixels(evaluated[0]["quality_png"], colour) for colour in LINE_COLOURS[:3]]
    assert drawn[0] > 50 and drawn[1] > 0 and drawn[2] == 0, drawn


def test_two_seeds_agree_within_their_standard_errors(evaluated):
    first, second = ({(r["kind"], r["steps"]): r for r in evaluated[s]["rows"]} for s in (0, 1))
    assert first.keys() == second.keys() == {("meanflow", 1), ("meanflow", 2), ("euler", 2)}
    for key, row in first.items():
        # Not recall: its binomial s.e. takes the generated set's k-NN manifold as given, and that
        # manifold is what changes with the seed (a few stray samples with wide balls cover much of
        # the real set): two seeds of a barely trained model differ by many of its s.e.
        for name in ("fd", "kid", "precision"):
            a, b = row["scores"][name], second[key]["scores"][name]
            assert a["n"] == b["n"], (key, name)
            # (<=: a 20-step model's precision may be exactly 0 with a binomial s.e. of 0 twice)
            assert abs(a["value"] - b["value"]) <= 3 * math.hypot(a["stderr"], b["stderr"]), (key, name, a, b)
        assert row["scores"]["fd"]["stderr"] > 0 and row["scores"]["kid"]["stderr"] > 0
        assert row["scores"] != second[key]["scores"]  # two independent evaluations, not one twice


def test_class_fidelity_is_the_classifiers_accuracy_on_the_samples(feature_cache, digits_run, evaluated):
    """The one-step samples regenerated here from seed 0's noise and labels, and judged directly."""
    model = load_model(digits_run / "last.pt", torch.device("cpu")).model
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn((HELD_OUT, 1, 8, 8), generator=generator)
    labels = torch.randint(0, 10, (HELD_OUT,), generator=generator)
    with torch.no_grad():
        samples = sample_meanflow(model, noise, 1, y=labels)
    net = digits_net(feature_cache)
    row = next(r for r in evaluated[0]["rows"] if (r["kind"], r["steps"]) == ("meanflow", 1))
    accuracy = (net.logits(samples).argmax(1) == labels).double().mean().item()
    assert row["class_fidelity"]["value"] == pytest.approx(accuracy, abs=1e-9)
    assert row["class_fidelity"]["n"] == HELD_OUT

    # About 30 samples per class: fewer than per-class FD's covariances need, which the JSON says.
    assert "per_class_fd" not in row
    assert evaluated[0]["notes"] == [
        "per-class FD left out: it needs 40 samples of each class on each side, the rarest class has "
        f"{rarest_class_count(digits_run, labels)} (n = 297 over 10 classes; raise --n)"
    ]


def rarest_class_count(digits_run: Path, labels: torch.Tensor) -> int:
    cfg = load_model(digits_run / "last.pt", torch.device("cpu")).cfg
    held_labels = build_data(cfg.data, "cpu", cfg.seed, batch_size=HELD_OUT).held_out_labeled(HELD_OUT)[1]
    return min(min(int((held_labels == k).sum()), int((labels == k).sum())) for k in range(10))


def test_per_class_fd_is_each_named_class_scored_alone(feature_cache):
    """600 labelled digits against 600 others (about 60 per class: enough for per-class FD)."""
    net = digits_net(feature_cache)
    source = build_data(DataConfig(name="digits", class_conditional=True), "cpu", 0, batch_size=1200)
    x, y = source.next_batch(torch.Generator().manual_seed(0))
    reference = FeatureReference.of(net, source, x[:600], y[:600], 250)
    row = evaluation.EvalRow("m", "meanflow", 1, 1, 0.0, 0.0)
    assert reference.score(row, x[600:], y[600:]) is None
    assert list(row.per_class_fd) == source.class_names
    real, fake = net.features(x[:600]), net.features(x[600:])
    for k, name in enumerate(source.class_names):
        truth = frechet_distance(real[y[:600] == k], fake[y[600:] == k])
        assert row.per_class_fd[name] == truth
    assert row.class_fidelity.value == (net.logits(x[600:]).argmax(1) == y[600:]).double().mean().item()


def test_too_few_samples_is_one_line_before_any_sampling(digits_run, tmp_path, monkeypatch):
    sampled = []
    monkeypatch.setattr(evaluation, "generate", lambda *a, **k: sampled.append(1))
    result = zoo("eval", digits_run, "--n", 100, "--json", tmp_path / "e.json", "--device", "cpu")
    assert result.exit_code == 2, result.output
    line = " ".join(result.output.split())
    assert "feature metrics need at least 200 samples on each side, got 100: raise --n" in line
    assert "Traceback" not in result.output and sampled == [] and not list(tmp_path.iterdir())


def test_periodic_and_final_evaluations_log_feature_metrics_to_trackio(digits_run, isolated_trackio):
    records = [json.loads(line) for line in (digits_run / "metrics.jsonl").read_text().splitlines()]
    evaluations = {r["step"]: r for r in records if "eval/fd_meanflow_1" in r}
    assert sorted(evaluations) == [10, 20]
    assert {"eval/kid_meanflow_1_se", "eval/precision_meanflow_1", "eval/class_fidelity_meanflow_1"} <= set(
        evaluations[10]
    )
    assert "eval/fd_data_floor" in evaluations[20] and "eval/fd_data_floor" not in evaluations[10]
    logged = trackio_metric(isolated_trackio, PROJECT, "cd", "eval/fd_meanflow_1")
    assert logged == [(step, pytest.approx(evaluations[step]["eval/fd_meanflow_1"])) for step in (10, 20)]
