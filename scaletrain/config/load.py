"""TOML loading, dotted CLI overrides and type checking for the config tree.

Precedence, lowest first: dataclass defaults < the model flavor's values < the TOML file <
`--section.key value` overrides. Unknown sections and keys are errors with a "did you mean"
suggestion; values are checked against the annotated field type and the error names the key.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

from scaletrain.config.flavors import FLAVORS, model_config_for
from scaletrain.config.schema import Config
from scaletrain.config.validate import check_choice, did_you_mean, is_choice, validate_config
from scaletrain.errors import ConfigError

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _field_types(node_cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(node_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(node_cls)}


def section_types() -> dict[str, type]:
    """Section name -> dataclass type of that node of the config tree."""
    return _field_types(Config)


def _table_type(typ: Any) -> type | None:
    """The dataclass `T` of a `list[T]` field (an array of TOML tables), else None."""
    args = typing.get_args(typ)
    if typing.get_origin(typ) is list and len(args) == 1 and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def coerce_table(key: str, table: Any, node_cls: type) -> Any:
    """Build dataclass `node_cls` from one TOML table, each value coerced to its field's type;
    ConfigError naming `key` for a non-table or an unknown key (with "did you mean")."""
    if not isinstance(table, dict):
        raise ConfigError(f"{key} must be a table, got {table!r}.")
    types = _field_types(node_cls)
    for name in table:
        if name not in types:
            raise ConfigError(f"unknown key '{name}' in {key}.{did_you_mean(name, types)} "
                              f"Keys: {', '.join(types)}.")
    return node_cls(**{name: coerce(f"{key}.{name}", v, types[name]) for name, v in table.items()})


def coerce(key: str, value: Any, typ: type, from_cli: bool = False) -> Any:
    """Convert a TOML value (typed) or a CLI string (`from_cli`) to `typ`, raising ConfigError
    naming `key`. A TOML string never stands in for a number: `steps = "10"` is an error. A
    `Literal[...]` field takes one of its values (the error lists them, with "did you mean").
    A `list[Dataclass]` field is an array of tables (`[[section.key]]`), TOML only."""
    node_cls = _table_type(typ)
    if node_cls is not None:
        if from_cli:
            raise ConfigError(f"{key} is a list of tables ([[{key}]] in the TOML file) and cannot be set "
                              "on the command line; edit the config file.")
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list of tables: write each entry as a [[{key}]] table.")
        return [coerce_table(f"{key}[{i}]", item, node_cls) for i, item in enumerate(value)]
    if is_choice(typ):  # a Literal of allowed strings, from TOML or the command line alike
        return check_choice(key, value, typ)
    from_cli = from_cli and isinstance(value, str) and typ is not str
    if typ is bool:
        if isinstance(value, bool):
            return value
        if from_cli and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{key} must be true or false, got {value!r}.")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}.")
        if isinstance(value, int):
            return value
        if from_cli:
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key} must be an integer, got {value!r}.")
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}.")
        if isinstance(value, (int, float)):
            return float(value)
        if from_cli:
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}.")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}; quote it in TOML.")
    raise ConfigError(f"{key}: unsupported field type {typ!r}")  # a schema bug, not user input


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file into nested dicts; errors name the file and the line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist. Presets live in configs/.")
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text.") from None


def _is_override(arg: str) -> bool:
    """Whether `arg` names a config key: `--section.key` or `--section.key=VALUE`."""
    return arg.startswith("--") and "." in arg.split("=", 1)[0]


def split_overrides(args: list[str]) -> tuple[list[str], list[str]]:
    """(the other arguments, the `--section.key VALUE` / `--section.key=VALUE` overrides), each
    in the order given. The CLI takes the overrides out before argparse reads the rest, so a
    VALUE is never mistaken for a sub-command."""
    rest: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(args):
        takes_value = _is_override(args[i]) and "=" not in args[i] and i + 1 < len(args)
        (overrides if _is_override(args[i]) else rest).extend(args[i:i + 1 + takes_value])
        i += 1 + takes_value
    return rest, overrides


def parse_overrides(args: list[str]) -> dict[str, str]:
    """Turn ['--model.dim', '128', '--train.steps=5'] into {'model.dim': '128', ...}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not _is_override(arg):
            raise ConfigError(
                f"unexpected argument {arg!r}; config overrides look like --section.key VALUE "
                "(e.g. --train.steps 50)."
            )
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} needs a value, e.g. {arg} 10.")
            key, value = arg[2:], args[i + 1]
            i += 2
        out[key] = value
    return out


def _nest(flat: dict[str, str]) -> dict[str, dict[str, Any]]:
    nested: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        section, _, name = key.partition(".")
        if "." in name:
            raise ConfigError(f"override --{key}: keys are exactly two levels (--section.key).")
        nested.setdefault(section, {})[name] = value
    return nested


def _check_keys(raw: dict[str, Any], origin: str, cli: bool = False) -> None:
    """Unknown sections and keys are errors with a suggestion spelled as the user wrote it:
    `--train.steps` for a command-line override (`cli`), `train.steps` / `[train]` in TOML."""
    sections = section_types()
    for section, table in raw.items():
        if section not in sections:
            spell = (lambda s: " ".join(f"--{s}.{key}" for key in table)) if cli else (lambda s: f"[{s}]")
            raise ConfigError(f"unknown config section '{section}' in {origin}."
                              f"{did_you_mean(section, sections, spell)} Sections: {', '.join(sections)}.")
        if not isinstance(table, dict):
            raise ConfigError(f"'{section}' in {origin} must be a table ([{section}]).")
        fields = _field_types(sections[section])
        for key in table:
            if key not in fields:
                spell = lambda k: f"{'--' if cli else ''}{section}.{k}"  # noqa: E731
                raise ConfigError(f"unknown key '{section}.{key}' in {origin}.{did_you_mean(key, fields, spell)}")


def build_config(toml: dict[str, Any] | None = None, overrides: dict[str, str] | None = None,
                 toml_origin: str = "the config file") -> Config:
    """Assemble a Config from parsed TOML and flat dotted overrides, then validate it.
    `toml_origin` names where the TOML came from in error messages (e.g. its path)."""
    toml = toml or {}
    cli = _nest(overrides or {})
    _check_keys(toml, toml_origin)
    _check_keys(cli, "the command line", cli=True)
    cfg = Config()
    sections = section_types()
    for section, node_cls in sections.items():
        types = _field_types(node_cls)
        values = {k: coerce(f"{section}.{k}", v, types[k]) for k, v in toml.get(section, {}).items()}
        values.update({k: coerce(f"{section}.{k}", v, types[k], from_cli=True) for k, v in cli.get(section, {}).items()})
        if section == "model":
            flavor = values.pop("flavor", cfg.model.flavor)
            if flavor not in FLAVORS:
                model_config_for(flavor)  # raises ConfigError with a suggestion
            node = model_config_for(flavor, **values)
        else:
            node = node_cls(**values)
        setattr(cfg, section, node)
    validate_config(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | dict[str, str] | None = None) -> Config:
    """Load a TOML preset (or defaults when `path` is None) and apply CLI overrides."""
    toml = read_toml(path) if path is not None else {}
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    return build_config(toml, overrides, str(path) if path is not None else "the config file")


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """The resolved config as nested plain dicts (what is written to the run folder)."""
    return dataclasses.asdict(cfg)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Rebuild a Config from `config_to_dict` output (e.g. a run folder's config.toml)."""
    return build_config(raw, None)


def write_config(cfg: Config, path: str | Path, header: str = "") -> None:
    """Write the resolved config as TOML, atomically (temp file + rename); `header` (TOML
    comment lines) goes first."""
    import tomli_w

    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(header + tomli_w.dumps(config_to_dict(cfg)))
    tmp.replace(p)
