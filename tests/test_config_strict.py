"""Configs are taken as written: no bool -> int or string -> number coercion from a preset, the
environment or the command line; every number bounded and finite; an unknown `ZOO_` variable
refused like an unknown key; every such mistake one line, exit 2, nothing written."""

import pytest
from tiny_runs import TINY_RUN
from typer.testing import CliRunner

from zoo.config import ConfigError, config_to_toml, load_config
from zoo.config.schema import MAX_STEPS
from zoo.environment import NON_CONFIG_ENV
from zoo_cli.main import app

runner = CliRunner()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def refused(fragments: list[str], *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("train.steps=true", ["train.steps = True", "valid integer"]),
        ("train.auto_microbatch=yes", ["train.auto_microbatch = 'yes'", "valid boolean"]),
        ("train.auto_microbatch=1", ["train.auto_microbatch = 1", "valid boolean"]),
        ("train.steps=1e10", ["train.steps", "valid integer", f"1 <= steps <= {MAX_STEPS}"]),
        ('train.steps="100"', ["train.steps = '100'", "valid integer"]),
        ("train.steps=99999999999999999999", ["train.steps", f"1 <= steps <= {MAX_STEPS}"]),
        ("train.memory_limit_gb=inf", ["train.memory_limit_gb = inf", "finite", "0 < memory_limit_gb <="]),
        ("loss.weight_c=inf", ["loss.weight_c = inf", "finite", "0 < weight_c <="]),
        ("loss.weight_c=nan", ["loss.weight_c", "finite"]),
        ("optim.lr=-inf", ["optim.lr", "finite"]),
        ("seed=true", ["seed = True", "valid integer"]),
        ("seed=-1", ["seed = -1", "0 <= seed"]),
        ('output_dir=""', ["output_dir = ''", "at least 1 character"]),
        ("output_dir=", ["output_dir = ''"]),
        ("train=5", ["train is a section", "train.KEY=VALUE"]),
    ],
)
def test_overrides_are_not_coerced_and_are_bounded(override, fragments):
    message = refused(fragments, "moons", [override])
    assert "\n" not in message  # one problem, one line


def test_right_types_still_pass_and_ints_serve_as_floats():
    cfg = load_config(
        "moons", ["train.steps=7", "optim.lr=1", "optim.betas=[0.5, 0.9]", "train.memory_limit_gb=2"]
    )
    assert (cfg.train.steps, cfg.optim.lr, cfg.optim.betas, cfg.train.memory_limit_gb) == (
        7,
        1.0,
        (0.5, 0.9),
        2.0,
    )


def test_preset_values_are_taken_as_written(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text('[train]\nsteps = "100"\n')
    refused(["train.steps = '100'", "valid integer"], str(preset))
    preset.write_text("[train]\nauto_microbatch = 1\n")
    refused(["train.auto_microbatch = 1", "valid boolean"], str(preset))
    preset.write_text("train = 5\n")
    refused(["train = 5", "section"], str(preset), ["train.steps=3"])


def test_unreadable_presets_are_one_line(tmp_path):
    preset = tmp_path / "latin1.toml"
    preset.write_bytes(b"[train]\nsteps = 10 # caf\xe9\n")
    refused([str(preset), "not UTF-8"], str(preset))
    (tmp_path / "x.toml").mkdir()
    message = refused(["is a folder"], str(tmp_path / "x.toml"))
    assert "does not exist" not in message
    refused(["does not exist"], str(tmp_path / "missing.toml"))


@pytest.mark.parametrize(
    "name, value, fragments",
    [
        ("ZOO_FOO", "1", ["ZOO_FOO sets no configuration key", "ZOO_CACHE_DIR"]),
        ("ZOO_STEPS", "5", ["ZOO_STEPS", "did you mean ZOO_TRAIN__STEPS?"]),
        ("ZOO_TRAIN__FOO", "1", ["ZOO_TRAIN__FOO", "keys under train: steps"]),
        ("ZOO_TRAIN", "{not json", ["ZOO_TRAIN must be a JSON object", "'{not json'"]),
        ("ZOO_TRAIN", "5", ["ZOO_TRAIN", "section"]),
        ("ZOO_TRAIN__STEPS", "true", ["train.steps (from $ZOO_TRAIN__STEPS) = True", "valid integer"]),
        ("ZOO_TRAIN__AUTO_MICROBATCH", "yes", ["$ZOO_TRAIN__AUTO_MICROBATCH", "valid boolean"]),
        ("ZOO_LOSS__WEIGHT_C", "inf", ["$ZOO_LOSS__WEIGHT_C", "finite"]),
        ("ZOO_", "1", ["ZOO_", "empty key"]),
    ],
)
def test_environment_is_checked_like_overrides(monkeypatch, name, value, fragments):
    monkeypatch.setenv(name, value)
    message = refused(fragments, "moons")
    assert "\n" not in message


def test_environment_settings_that_are_right_still_apply(monkeypatch, tmp_path):
    monkeypatch.setenv("ZOO_TRAIN", '{"steps": 7, "auto_microbatch": false}')
    monkeypatch.setenv("ZOO_LOSS__RATIO", "0.5")
    monkeypatch.setenv("ZOO_OUTPUT_DIR", str(tmp_path))
    for name in NON_CONFIG_ENV:  # zoo's own variables are not configuration keys
        monkeypatch.setenv(name, "anything")
    cfg = load_config("moons", ["loss.ratio=0.25"])
    assert (cfg.train.steps, cfg.train.auto_microbatch, cfg.loss.ratio) == (7, False, 0.25)
    assert cfg.output_dir == str(tmp_path)


@pytest.fixture
def tiny_preset(workdir):
    """A two-step moons run as a preset: were a mistake not refused, the run would end in a second."""
    (workdir / "tiny.toml").write_text(config_to_toml(load_config("moons", [*TINY_RUN, "train.steps=2"])))
    (workdir / "x.toml").mkdir()
    return "tiny.toml"


@pytest.mark.parametrize(
    "args, env, fragment",
    [
        (["train.steps=true"], {}, "train.steps = True"),
        (["train=5", "--steps", "2"], {}, "train is a section"),
        (["loss.weight_c=inf"], {}, "loss.weight_c = inf"),
        (['output_dir=""'], {}, "output_dir = ''"),
        ([], {"ZOO_STEPS": "5"}, "ZOO_TRAIN__STEPS"),
        ([], {"ZOO_TRAIN": "{not json"}, "ZOO_TRAIN must be a JSON object"),
        (["--resume"], {}, "cannot resume run 'r'"),
    ],
)
def test_cli_config_mistakes_are_one_line_exit_2_and_write_nothing(workdir, tiny_preset, args, env, fragment):
    result = runner.invoke(app, ["train", tiny_preset, *args, "--run-name", "r"], env=env)
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("error: "), result.output
    assert fragment in result.output
    assert sorted(p.name for p in workdir.iterdir()) == ["tiny.toml", "x.toml"]


def test_cli_names_a_folder_given_as_a_preset(workdir, tiny_preset):
    result = runner.invoke(app, ["train", "x.toml", "--run-name", "r"])
    assert (
        result.exit_code == 2 and result.output == "error: config file x.toml is a folder, not a TOML file\n"
    )


@pytest.mark.slow  # two tiny runs (5 + 5 steps and their evaluations): ~5 s of CPU
def test_resume_finds_a_run_under_the_environments_output_dir(workdir, monkeypatch):
    """A run started with ZOO_OUTPUT_DIR set is resumed from there, with the variable set again."""
    monkeypatch.setenv("ZOO_OUTPUT_DIR", str(workdir / "alt"))
    args = ["train", "moons", *TINY_RUN, "train.save_every=5", "--run-name", "m6"]
    assert runner.invoke(app, [*args, "--steps", "5"]).exit_code == 0
    result = runner.invoke(app, [*args, "--steps", "10", "--resume"])
    assert result.exit_code == 0, result.output
    assert (workdir / "alt" / "m6" / "step_0000010.pt").exists() and not (workdir / "outputs").exists()
