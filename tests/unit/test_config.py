"""Config tree: TOML + dotted overrides, precedence, and errors that name the key."""

import pytest

from scaletrain.config import load_config, parse_overrides, read_toml, write_config
from scaletrain.config.load import build_config, config_from_dict, config_to_dict
from scaletrain.errors import ConfigError


def _toml(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_are_valid():
    cfg = load_config(None)
    assert cfg.model.flavor == "debug" and cfg.parallel.dp_shard == -1


def test_precedence_flavor_then_toml_then_cli(tmp_path):
    p = _toml(tmp_path, '[model]\nflavor = "125M"\nn_layers = 3\n[train]\nsteps = 7\n')
    cfg = load_config(p, ["--model.n_layers", "5", "--train.seed=3"])
    assert cfg.model.dim == 768  # from the flavor
    assert cfg.model.n_layers == 5  # CLI beats TOML
    assert (cfg.train.steps, cfg.train.seed) == (7, 3)


def test_cli_flavor_switch_keeps_explicit_keys(tmp_path):
    cfg = load_config(None, ["--model.flavor", "anchor_1b", "--model.n_layers", "2"])
    assert (cfg.model.dim, cfg.model.n_layers, cfg.model.n_kv_heads) == (2048, 2, 8)


@pytest.mark.parametrize("args,needle", [
    (["--trian.steps", "3"], "Did you mean '--train.steps'?"),
    (["--train.step", "3"], "Did you mean '--train.steps'?"),
    (["--train.steps", "many"], "train.steps must be an integer"),
    (["--optim.lr", "-1e-3"], "optim.lr must be > 0"),
    (["--data.seq_len", "100000"], "data.seq_len = 100000 exceeds model.max_seq_len"),
    (["--train.compile", "maybe"], "train.compile must be true or false"),
    (["--schedule.kind", "cosin"], "schedule.kind = 'cosin' is not one of 'cosine', 'wsd', 'constant', 'linear'. "
                                   "Did you mean 'cosine'?"),
    (["--model.flavor", "llama3_7b"], "llama3_8b"),
    (["--model.n_kv_heads", "3"], "n_kv_heads"),
    (["--parallel.dp_shard", "0"], "parallel.dp_shard"),
    (["train.steps", "3"], "--section.key VALUE"),
    (["--train.steps"], "needs a value"),
])
def test_bad_values_name_the_key(args, needle):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(None, args)
    assert needle in str(info.value)


def test_toml_type_errors_and_syntax(tmp_path):
    with pytest.raises(ConfigError, match="train.steps must be an integer"):
        load_config(_toml(tmp_path, '[train]\nsteps = "10"\n'))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_toml(tmp_path, "[train\nsteps = 1\n"))
    with pytest.raises(ConfigError, match=r"unknown config section 'modle'.*Did you mean '\[model\]'"):
        load_config(_toml(tmp_path, "[modle]\ndim = 3\n"))
    # A key of a TOML file is suggested as TOML spells it, and the file is named.
    toml = _toml(tmp_path, "[train]\nstepz = 3\n")
    with pytest.raises(ConfigError, match=f"unknown key 'train.stepz' in {toml}. Did you mean 'train.steps'[?]"):
        load_config(toml)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_bool_and_float_coercion():
    cfg = load_config(None, ["--train.compile", "true", "--optim.lr", "1e-3", "--model.tie_embeddings=yes"])
    assert cfg.train.compile is True and cfg.optim.lr == 1e-3 and cfg.model.tie_embeddings is True


def test_parse_overrides_forms():
    assert parse_overrides(["--a.b", "1", "--c.d=x=y"]) == {"a.b": "1", "c.d": "x=y"}


def test_split_overrides_takes_config_keys_out_of_a_command_line_in_order():
    from scaletrain.config.load import split_overrides

    argv = ["bench", "--config", "c.toml", "--train.steps", "3", "ffn", "--x.y=2", "--tokens", "4", "--train.seed"]
    assert split_overrides(argv) == (["bench", "--config", "c.toml", "ffn", "--tokens", "4"],
                                     ["--train.steps", "3", "--x.y=2", "--train.seed"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["--model.flavor", "cpu_demo", "--train.steps", "9"])
    write_config(cfg, tmp_path / "config.toml")
    again = config_from_dict(read_toml(tmp_path / "config.toml"))
    assert config_to_dict(again) == config_to_dict(cfg)


def test_presets_load():
    from pathlib import Path

    presets = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.toml"))
    assert {p.stem for p in presets} >= {"cpu_debug", "cpu_demo", "anchor_1b"}
    for p in presets:
        build_config(read_toml(p))  # each preset is valid


def test_choice_fields_are_checked_from_their_literal_type(tmp_path):
    """TOML and code-built configs meet the same check as the command line: the schema's
    Literal type is the one list of allowed values."""
    import dataclasses

    from scaletrain.config.validate import validate_config

    with pytest.raises(ConfigError, match=r"train.precision = 16 is not one of 'auto', 'fp32', 'bf16', 'fp8'\."):
        load_config(_toml(tmp_path, "[train]\nprecision = 16\n"))
    cfg = load_config(None)
    bad = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, nan_policy="skp"))
    with pytest.raises(ConfigError, match="train.nan_policy = 'skp' is not one of .* Did you mean 'skip'"):
        validate_config(bad)


FREE_TEXT = {"flavor", "path", "text_field", "cache_dir", "name", "domain", "sample_prompt"}


def test_every_string_field_with_fixed_values_is_a_literal():
    """A string field is free text (a name, a path, a prompt) or a Literal of its values: a new
    choice field declared as plain `str` would escape the load-time check."""
    import dataclasses
    import typing

    from scaletrain.config.load import section_types
    from scaletrain.config.schema import DomainConfig

    for node in [*section_types().values(), DomainConfig]:
        hints = typing.get_type_hints(node)
        for f in dataclasses.fields(node):
            if hints[f.name] is str:
                assert f.name in FREE_TEXT, f"{node.__name__}.{f.name} is a plain str: type it Literal[...]"
