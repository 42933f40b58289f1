"""Resolve a run's configuration: TOML preset < ZOO_ environment < command-line overrides.

Presets are the TOML files in `configs/`; a path to any TOML file works the same way.
Overrides are dotted `key=value` strings (`loss.ratio=0.75`, `model.channel_mults=[1,2]`);
values are parsed as TOML literals, falling back to plain strings.  Environment variables use
the `ZOO_` prefix and `__` for nesting (`ZOO_TRAIN__STEPS=100`).
"""

import contextvars
import tomllib
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import BaseModel, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from zoo.config.schema import TRAINING_JVP_MODES, DiTConfig, MLPConfig, UNetConfig, ZooConfigBody

MODEL_CLASSES: dict[str, type[BaseModel]] = {"mlp": MLPConfig, "unet": UNetConfig, "dit": DiTConfig}

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs"

# The TOML file of the load in progress: pydantic-settings builds sources per class, so the
# path reaches `settings_customise_sources` through a context variable rather than a global.
_toml_path: contextvars.ContextVar[Path | None] = contextvars.ContextVar("zoo_toml", default=None)


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says what is wrong and how to fix it."""


class ZooConfig(BaseSettings, ZooConfigBody):
    model_config = SettingsConfigDict(
        env_prefix="ZOO_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _toml_path.get()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def preset_path(name_or_path: str) -> Path:
    """A preset name (`cifar10`) or a path to a TOML file."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml":
        if not candidate.is_file():
            raise ConfigError(f"config file {candidate} does not exist")
        return candidate
    path = PRESET_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise ConfigError(
            f"unknown preset {name_or_path!r}; available: {', '.join(available_presets())} "
            "(or pass a path ending in .toml)"
        )
    return path


def parse_value(text: str) -> Any:
    """A TOML literal (`0.75`, `true`, `[1, 2]`, `"x"`), `none`/`null` for None, else the string."""
    if text.strip().lower() in {"none", "null"}:
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['loss.ratio=0.5', 'seed=3'] -> {'loss': {'ratio': 0.5}, 'seed': 3}."""
    nested: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. loss.ratio=0.75)")
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
            node = child
        node[parts[-1]] = parse_value(value)
    return nested


def _lookup(data: Any, loc: tuple[Any, ...]) -> Any:
    for part in loc:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, (list, tuple)) and isinstance(part, int) and part < len(data):
            data = data[part]
        else:
            return None
    return data


def _schema_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that owns the last key of `loc` (for listing allowed keys)."""
    cls: type[BaseModel] = ZooConfigBody
    for part in loc[:-1]:
        if part in MODEL_CLASSES:  # the discriminator tag of the `model` union
            cls = MODEL_CLASSES[part]
            continue
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            cls = field.annotation
    return cls


def format_validation_error(err: ValidationError, given: dict[str, Any]) -> str:
    """One line per problem: the dotted key, the value given, and what is allowed."""
    lines = []
    for problem in err.errors():
        raw_loc = tuple(problem["loc"])
        # Discriminated unions put the tag ("unet") in the path; users never typed it.
        loc = tuple(
            p
            for i, p in enumerate(raw_loc)
            if not (i > 0 and raw_loc[i - 1] == "model" and p in MODEL_CLASSES)
        )
        key = ".".join(str(p) for p in loc) or "(top level)"
        value = problem.get("input", _lookup(given, loc))
        if problem["type"] == "extra_forbidden":
            owner = _schema_at(raw_loc)
            allowed = f" (allowed keys here: {', '.join(owner.model_fields)})" if owner else ""
            lines.append(f"{key}: unknown key{allowed}")
        else:
            lines.append(f"{key} = {value!r}: {problem['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_config(preset: str | None, overrides: list[str] | dict[str, Any] | None = None) -> ZooConfig:
    """Resolve preset + environment + overrides into a validated config, or raise ConfigError."""
    path = preset_path(preset) if preset else None
    given = overrides if isinstance(overrides, dict) else parse_overrides(overrides or [])
    if path is not None:
        try:
            tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
        given = {"preset": path.stem, **given}
    token = _toml_path.set(path)
    try:
        return ZooConfig(**given)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, given)) from None
    finally:
        _toml_path.reset(token)


def check_batch_split(cfg: ZooConfigBody, processes: int, how: str = "the number of processes") -> None:
    """`train.batch_size` (one optimiser step across all processes) must split evenly into
    processes x grad_accum micro-batches; checked before anything is launched."""
    parts = processes * cfg.train.grad_accum
    batch = cfg.train.batch_size
    if batch % parts:
        lower, upper = batch - batch % parts, batch - batch % parts + parts
        near = f"train.batch_size={upper}" if lower == 0 else f"train.batch_size={lower} or {upper}"
        raise ConfigError(
            f"train.batch_size={batch} must be divisible by processes x grad_accum = {processes} x "
            f"{cfg.train.grad_accum} = {parts}; use {near}, or change {how} or train.grad_accum"
        )


def check_new_run_jvp(cfg: ZooConfigBody) -> None:
    """A new MeanFlow run trains with a training JVP mode; the benchmark's modes are refused here,
    where no torch is loaded, so `zoo modal submit` says so before anything starts remotely.  A
    resumed run keeps the mode it started with and is not checked."""
    mode = cfg.loss.jvp
    if not cfg.loss.average_velocity or mode == "auto" or mode in TRAINING_JVP_MODES:
        return
    raise ConfigError(
        f"loss.jvp={mode!r} is one of the benchmark's modes (`zoo bench-jvp --modes {mode}` times it), "
        "not a training mode; train with loss.jvp=fused (the default) or loss.jvp=nograd (the reference)"
    )


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra`'s values, nested sections merged key by key (a resumed run's stored config
    extended by the command line's overrides)."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_from_dict(data: dict[str, Any]) -> ZooConfigBody:
    """A stored (resolved) config, validated without environment or preset influence."""
    try:
        return ZooConfigBody.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, data)) from None


def config_to_dict(cfg: ZooConfigBody) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def config_to_toml(cfg: ZooConfigBody) -> str:
    data = config_to_dict(cfg)
    # TOML has no null: leave unset optional keys out, so the file loads back to the same config.
    return tomli_w.dumps(_drop_none(data))


def _drop_none(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _drop_none(v) if isinstance(v, dict) else v for k, v in data.items() if v is not None}
