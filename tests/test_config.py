"""Config resolution: presets, dotted overrides, environment, and errors that name the problem."""

import re
import tomllib

import pytest

from zoo.config import (
    ConfigError,
    available_presets,
    config_from_dict,
    config_to_dict,
    config_to_toml,
    load_config,
)
from zoo.config.loading import parse_overrides, parse_value


def test_every_preset_validates():
    presets = available_presets()
    assert {"moons", "checkerboard", "digits", "fashion-mnist", "cifar10"} <= set(presets)
    for name in presets:
        cfg = load_config(name)
        assert cfg.preset == name


def test_cifar10_preset_has_paper_settings():
    cfg = load_config("cifar10")
    assert (cfg.loss.time_sampler, cfg.loss.time_mu, cfg.loss.time_sigma) == ("logit_normal", -2.0, 2.0)
    assert (cfg.loss.ratio, cfg.loss.weight_p, cfg.loss.weight_c) == (0.75, 0.75, 1e-3)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.betas) == ("adam", 6e-4, (0.9, 0.999))
    assert cfg.optim.warmup_steps > 0
    assert cfg.train.ema_decay == 0.9999
    assert cfg.model.arch == "unet" and cfg.model.dropout == 0.2
    assert (cfg.model.channels, cfg.model.channel_mults, cfg.model.blocks_per_res) == (128, [2, 2, 2], 4)
    assert cfg.model.attention_res == [16]


def test_overrides_parse_types_and_nest():
    assert parse_value("0.75") == 0.75 and parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2] and parse_value("adamw") == "adamw"
    assert parse_overrides(["loss.ratio=0.5", "seed=3"]) == {"loss": {"ratio": 0.5}, "seed": 3}
    cfg = load_config("moons", ["loss.ratio=0.5", "optim.lr=1e-4", "train.steps=7"])
    assert (cfg.loss.ratio, cfg.optim.lr, cfg.train.steps) == (0.5, 1e-4, 7)


def test_precedence_cli_over_env_over_preset(monkeypatch):
    assert load_config("moons").train.steps == 3000  # the preset's value
    monkeypatch.setenv("ZOO_TRAIN__STEPS", "77")
    assert load_config("moons").train.steps == 77
    assert load_config("moons", ["train.steps=5"]).train.steps == 5


@pytest.mark.parametrize(
    "override, expected",
    [
        (["loss.ratio=1.5"], ["loss.ratio", "1.5", "less than or equal to 1"]),
        (["loss.rato=0.5"], ["loss.rato", "unknown key", "ratio"]),
        (["model.widht=3"], ["model.widht", "unknown key", "hidden"]),
        (["bogus=1"], ["bogus", "unknown key"]),
        (["train.steps=abc"], ["train.steps", "'abc'", "integer"]),
        (["optim.betas=[0.9, 1.5]"], ["betas", "[0, 1)"]),
        (["device=tpu"], ["device", "'tpu'"]),
        (["data.name=mnist3d"], ["data.name", "mnist3d", "fashion-mnist"]),
        (["eval.solver_nfe=[0]"], ["eval.solver_nfe.0", "greater than or equal to 1"]),
        (["eval.meanflow_steps=[]"], ["eval.meanflow_steps", "at least 1"]),
        (
            ["loss.guidance_t_min=0.8", "loss.guidance_t_max=0.2"],
            ["guidance_t_min=0.8", "guidance_t_max=0.2"],
        ),
    ],
)
def test_bad_values_name_key_value_and_rule(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config("moons", override)
    message = str(info.value)
    for fragment in expected:
        assert fragment in message


def test_nested_model_errors_without_union_tags():
    with pytest.raises(ConfigError) as info:
        load_config("digits", ["model.num_groups=7"])
    message = str(info.value)
    assert "model.num_groups" in message or "num_groups=7" in message
    assert "unet" not in message.removeprefix("invalid configuration: ").split(" ")[0]


def test_unknown_preset_and_bad_override_syntax():
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*moons"):
        load_config("nope")
    with pytest.raises(ConfigError, match="key=value"):
        load_config("moons", ["loss.ratio"])


def test_toml_round_trip_and_dict_round_trip(tmp_path):
    cfg = load_config("cifar10", ["run_name=x", "loss.ratio=0.5"])
    path = tmp_path / "c.toml"
    path.write_text(config_to_toml(cfg))
    again = load_config(str(path))
    assert config_to_dict(again) | {"preset": cfg.preset} == config_to_dict(cfg)
    assert config_from_dict(config_to_dict(cfg)) == config_from_dict(
        config_to_dict(again) | {"preset": "cifar10"}
    )
    assert tomllib.loads(path.read_text())["loss"]["ratio"] == 0.5


def test_objective_presets_carry_their_papers_settings():
    imf = load_config("imagenet-latents-imf")
    assert (imf.model.arch, imf.model.size, imf.model.depth, imf.model.v_head) == ("dit", "B/2", 12, 8)
    assert imf.model.guidance_inputs and imf.model.time_inputs == "h" and imf.data.class_conditional
    assert (imf.optim.name, imf.optim.lr, imf.optim.betas, imf.optim.weight_decay) == (
        "adamw",
        1e-4,
        (0.9, 0.95),
        0.0,
    )
    assert (imf.train.batch_size, imf.train.ema_decay) == (1024, 0.9999)
    assert (imf.loss.kind, imf.loss.ratio, imf.loss.weight_c, imf.loss.omega_max) == ("imf", 0.5, 0.01, 8.0)
    fashion = load_config("fashion-mnist-imf")
    assert fashion.data.class_conditional and fashion.model.guidance_inputs and fashion.model.v_head == 1
    base = load_config("fashion-mnist")
    for name in ("fashion-mnist-imf", "fashion-mnist-alphaflow"):
        variant = load_config(name)
        # the same network and budget as the MeanFlow preset: the objectives compare like with like
        same = ("channels", "channel_mults", "blocks_per_res", "attention_res", "num_groups")
        assert all(getattr(variant.model, k) == getattr(base.model, k) for k in same)
        assert (variant.train.steps, variant.train.batch_size) == (base.train.steps, base.train.batch_size)
    assert load_config("fashion-mnist-alphaflow").loss.kind == "alphaflow"
    assert load_config("cifar10-imf").model.v_head == 1


@pytest.mark.parametrize(
    ("preset", "overrides", "message"),
    [
        ("moons", ["eval.guidance_interval=[0.2, 0.8]"], "needs a model conditioned on guidance"),
        ("fashion-mnist-imf", ["eval.guidance_interval=[0.8, 0.2]"], "0 <= a <= b <= 1"),
        ("fashion-mnist-imf", ["eval.guidance_interval=[0.2, 1.5]"], "0 <= a <= b <= 1"),
        ("fashion-mnist-imf", ["eval.guidance=9.0"], "[1, loss.omega_max=8]"),
        ("fashion-mnist-imf", ["eval.guidance_interval=[0.6, 0.9]"], "a <= 0.5 <= b"),
        ("fashion-mnist-imf", ["eval.guidance=0.5"], "[1, loss.omega_max=8]"),
    ],
)
def test_evaluation_guidance_the_model_cannot_sample_is_refused(preset, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as refused:
        load_config(preset, overrides)
    # A rule across sections is one line of its own: the config it was checked on stays out.
    assert "\n" not in str(refused.value) and "{" not in str(refused.value)


def test_a_stored_config_loads_with_an_interval_a_new_run_could_not_start_with():
    """A checkpoint's config skips the rules that only guard a run's start: the run stays readable,
    and zoo sample/eval refuse the interval only where it is used (--guidance-interval fixes it)."""
    stored = config_to_dict(load_config("fashion-mnist-imf", []))
    stored["eval"]["guidance_interval"] = [0.6, 0.9]
    assert config_from_dict(stored).eval.guidance_interval == (0.6, 0.9)
    with pytest.raises(ConfigError, match=re.escape("a <= 0.5 <= b")):
        load_config("fashion-mnist-imf", ["eval.guidance_interval=[0.6, 0.9]"])


def test_an_evaluation_interval_loads_as_a_pair():
    cfg = load_config("fashion-mnist-imf", ["eval.guidance_interval=[0.2, 0.8]", "eval.guidance=3.0"])
    assert cfg.eval.guidance_interval == (0.2, 0.8)
    assert config_from_dict(config_to_dict(cfg)).eval.guidance_interval == (0.2, 0.8)
