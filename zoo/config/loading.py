"""Resolve a run's configuration: TOML preset < ZOO_ environment < command-line overrides.

Presets are the TOML files in `configs/`; a path to any TOML file works the same way.
Overrides are dotted `key=value` strings (`loss.ratio=0.75`, `model.channel_mults=[1,2]`);
values are parsed as TOML literals, falling back to plain strings.  Environment variables use
the `ZOO_` prefix and `__` for nesting (`ZOO_TRAIN__STEPS=100`), their values parsed like an
override's; a whole section may be given as a JSON object (`ZOO_TRAIN='{"steps": 100}'`).  A
`ZOO_` variable that names no key is an error, except those zoo.environment lists.
"""

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import BaseModel, ValidationError

from zoo.config.schema import STORED, TRAINING_JVP_MODES, DiTConfig, MLPConfig, UNetConfig, ZooConfigBody
from zoo.environment import CONFIG_ENV_PREFIX, NON_CONFIG_ENV

MODEL_CLASSES: dict[str, type[BaseModel]] = {"mlp": MLPConfig, "unet": UNetConfig, "dit": DiTConfig}

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says what is wrong and how to fix it."""


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def preset_path(name_or_path: str) -> Path:
    """A preset name (`cifar10`) or a path to a TOML file."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml":
        if candidate.is_dir():
            raise ConfigError(f"config file {candidate} is a folder, not a TOML file")
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


def read_toml(path: Path) -> dict[str, Any]:
    """A preset's settings, or a ConfigError that says why the file cannot be read."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8 TOML") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None


def parse_value(text: str) -> Any:
    """A TOML literal (`0.75`, `true`, `[1, 2]`, `"x"`), `none`/`null` for None, else the string."""
    if text.strip().lower() in {"none", "null"}:
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _is_section(parts: list[str]) -> bool:
    """Whether the dotted key `parts` names a section (`train`, `model`) rather than a value."""
    cls: type[BaseModel] = ZooConfigBody
    for part in parts:
        if part == "model" and cls is ZooConfigBody:
            return len(parts) == 1
        annotation = cls.model_fields[part].annotation if part in cls.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return False
        cls = annotation
    return True


def _set_nested(nested: dict[str, Any], parts: list[str], value: Any, what: str) -> None:
    if _is_section(parts) and not isinstance(value, dict):
        raise ConfigError(
            f"{what}: {'.'.join(parts)} is a section, not a value; set one of its keys instead "
            f"(e.g. {'.'.join(parts)}.KEY=VALUE)"
        )
    node = nested
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{what} conflicts with an earlier setting of {part!r}")
        node = child
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['loss.ratio=0.5', 'seed=3'] -> {'loss': {'ratio': 0.5}, 'seed': 3}."""
    nested: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. loss.ratio=0.75)")
        _set_nested(nested, key.split("."), parse_value(value), f"override {item!r}")
    return nested


def environment_settings(environ: Mapping[str, str] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """The settings of the `ZOO_` variables, and for each dotted key the variable that set it."""
    environ = os.environ if environ is None else environ
    nested: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for name in sorted(environ):
        if not name.upper().startswith(CONFIG_ENV_PREFIX) or name.upper() in NON_CONFIG_ENV:
            continue
        parts = name[len(CONFIG_ENV_PREFIX) :].lower().split("__")
        if not all(parts):
            raise ConfigError(f"environment variable {name} has an empty key; use e.g. ZOO_TRAIN__STEPS")
        text = environ[name]
        if _is_section(parts):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    f"environment variable {name} must be a JSON object of {parts[-1]}'s keys "
                    f"(e.g. {name}='{{\"steps\": 100}}'), got {text!r}: {exc.msg}"
                ) from None
        else:
            value = parse_value(text)
        _set_nested(nested, parts, value, f"environment variable {name}")
        origins[".".join(parts)] = name
    return nested, origins


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


def allowed_range(owner: type[BaseModel] | None, name: Any) -> str:
    """'1 <= steps <= 100000000' from a field's bounds; '' for a field without any."""
    field = owner.model_fields.get(name) if owner is not None and isinstance(name, str) else None
    if field is None:
        return ""
    low = high = ""
    for rule in field.metadata:
        for attr, text in (("ge", "<="), ("gt", "<")):
            if getattr(rule, attr, None) is not None:
                low = f"{getattr(rule, attr)} {text} "
        for attr, text in (("le", "<="), ("lt", "<")):
            if getattr(rule, attr, None) is not None:
                high = f" {text} {getattr(rule, attr)}"
    return f"{low}{name}{high}" if low or high else ""


def _section_keys(section: str) -> set[str]:
    """The keys of a section (for `model`, those of every architecture); empty for a plain value."""
    if section == "model":
        return {name for cls in MODEL_CLASSES.values() for name in cls.model_fields}
    annotation = ZooConfigBody.model_fields[section].annotation
    is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
    return set(annotation.model_fields) if is_model else set()


def unknown_variable_message(variable: str, key: str, owner: type[BaseModel] | None) -> str:
    """An environment variable that names no key: the ones meant, or the keys there are."""
    section, _, leaf = key.rpartition(".")
    if section and owner is not None:
        hint = f" (keys under {section}: {', '.join(owner.model_fields)})"
    else:
        meant = [
            f"ZOO_{s.upper()}__{leaf.upper()}" for s in ZooConfigBody.model_fields if leaf in _section_keys(s)
        ]
        hint = f" (did you mean {' or '.join(meant)}?)" if meant else ""
    return (
        f"environment variable {variable} sets no configuration key{hint}; unset it "
        f"(zoo's other ZOO_ variables: {', '.join(NON_CONFIG_ENV)})"
    )


def format_validation_error(
    err: ValidationError, given: dict[str, Any], origins: Mapping[str, str] | None = None
) -> str:
    """One line per problem: the dotted key (and the variable that set it), the value given, and
    what is allowed."""
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
        variable = (origins or {}).get(key)
        value = problem.get("input", _lookup(given, loc))
        owner = _schema_at(raw_loc)
        if problem["type"] == "extra_forbidden":
            allowed = f" (allowed keys here: {', '.join(owner.model_fields)})" if owner else ""
            if variable:
                lines.append(unknown_variable_message(variable, key, owner))
            else:
                lines.append(f"{key}: unknown key{allowed}")
            continue
        if isinstance(value, dict):
            # A rule across the keys of a section (or of sections): its message names the keys, and
            # the section's whole contents would bury it.
            message = problem["msg"].removeprefix("Value error, ")
            lines.append(message if not loc else f"{key}: {message}")
            continue
        if variable:
            key = f"{key} (from ${variable})"
        bounds = allowed_range(owner, raw_loc[-1]) if raw_loc else ""
        lines.append(f"{key} = {value!r}: {problem['msg']}" + (f" (allowed: {bounds})" if bounds else ""))
    # One problem stays one line; several get a line each.
    if len(lines) == 1:
        return f"invalid configuration: {lines[0]}"
    return "invalid configuration:\n  " + "\n  ".join(lines)


def resolve_sources(preset: str | None, given: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The merged, unvalidated settings of preset < environment < `given`, and the environment
    variable behind each key the environment set."""
    environment, origins = environment_settings()
    data = deep_merge(environment, given)
    if preset:
        path = preset_path(preset)
        data = deep_merge(read_toml(path), {**data, "preset": path.stem})
    return data, origins


def resolve_output_dir(preset: str | None, given: dict[str, Any]) -> str:
    """The output_dir the sources name (a resumed run is looked for where it was started)."""
    data, origins = resolve_sources(preset, given)
    value = data.get("output_dir", ZooConfigBody.model_fields["output_dir"].default)
    if not isinstance(value, str) or not value:
        where = f" (from ${origins['output_dir']})" if "output_dir" in origins else ""
        raise ConfigError(f"output_dir{where} = {value!r}: give the folder that holds the run folders")
    return value


def load_config(preset: str | None, overrides: list[str] | dict[str, Any] | None = None) -> ZooConfigBody:
    """Resolve preset + environment + overrides into a validated config, or raise ConfigError."""
    given = overrides if isinstance(overrides, dict) else parse_overrides(overrides or [])
    data, origins = resolve_sources(preset, given)
    try:
        return ZooConfigBody.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, data, origins)) from None


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
        elif key in merged and isinstance(merged[key], dict) != isinstance(value, dict):
            scalar = merged[key] if isinstance(value, dict) else value
            raise ConfigError(f"{key} = {scalar!r}: {key} is a section; set its keys ({key}.KEY=VALUE)")
        else:
            merged[key] = value
    return merged


def config_from_dict(data: dict[str, Any]) -> ZooConfigBody:
    """A stored (resolved) config, validated without environment or preset influence, and without
    the rules that only guard a run's start (schema.STORED)."""
    try:
        return ZooConfigBody.model_validate(data, context=STORED)
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
