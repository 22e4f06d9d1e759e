"""config.py: defaults, the four layers and their order, every error message, hashing."""
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from transferlab.config import (
    ENV_KEYS, STRATEGY_NAMES, Config, ConfigError, config_hash, load_config, parse_override,
    replace_in)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "config.yaml"
DOC = ROOT / "docs" / "configuration.md"


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    """No RANDOM_SEED / LOG_LEVEL from the machine running the tests."""
    for name in ("RANDOM_SEED", "LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Work in an empty directory, so no stray .env is found and paths read 'config.yaml'."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def leaf_keys(d, prefix=""):
    keys = set()
    for name, value in d.items():
        if isinstance(value, dict):
            keys |= leaf_keys(value, prefix + name + ".")
        else:
            keys.add(prefix + name)
    return keys


# ------------------------------------------------------------------------ the shipped file


def test_shipped_config_equals_the_dataclass_defaults():
    assert load_config(SHIPPED, env=False) == Config()


def test_shipped_config_sets_every_knob_and_nothing_else():
    raw = yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))
    assert leaf_keys(raw) == leaf_keys(Config().to_dict())


def test_every_knob_in_the_shipped_config_has_a_comment():
    # The comments in config.yaml are what a student reads: no knob without one.
    for line in SHIPPED.read_text(encoding="utf-8").splitlines():
        if re.match(r"\s*\w+:\s*[^\s#]", line):  # "key: value", not a section header
            assert "#" in line, f"config.yaml line without a comment: {line!r}"


def test_shipped_values_spot_check():
    config = load_config(SHIPPED, env=False)
    assert config.finetune.lr == 3e-4 and isinstance(config.finetune.lr, float)
    assert config.pretrain.lr == 3e-3  # written as 3e-3: must load as a float, not a string
    assert config.strategies.discriminative_lr.ratio == 32.0
    assert config.runner.strategies == STRATEGY_NAMES  # "all", expanded
    assert config.runner.sweep_values == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert config.logging.level == "INFO"


def test_the_shipped_config_takes_your_own_text_with_no_other_flag(in_tmp):
    """`--data x --source y` alone, as the README shows it, must pass the rules between
    knobs: data.max_len fits the shipped model's context without data.model."""
    config = load_config(SHIPPED, ["data.labelled=reviews.jsonl", "data.source=corpus/"], env=False)
    assert config.data.max_len <= config.model.block_size
    assert config.data.labelled == "reviews.jsonl" and not config.data.model


def test_config_is_frozen_and_json_able():
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.finetune.lr = 1.0
    d = json.loads(json.dumps(config.to_dict()))
    assert d["runner"]["seeds"] == [0]
    assert d["strategies"]["sparse_mask"]["keep_fraction"] == 0.05


def test_strategy_names():
    assert len(STRATEGY_NAMES) == 12 and "all" not in STRATEGY_NAMES
    assert "sparse_mask" in STRATEGY_NAMES and "scratch" in STRATEGY_NAMES


# ----------------------------------------------------------------------------- precedence


def test_yaml_beats_defaults_and_keeps_the_rest(in_tmp):
    write(in_tmp / "config.yaml", "finetune:\n  lr: 0.5\n")
    config = load_config("config.yaml")
    assert config.finetune.lr == 0.5
    assert config.finetune.steps == Config().finetune.steps
    assert config.model == Config().model


def test_dotenv_beats_yaml_and_set_beats_dotenv(in_tmp):
    write(in_tmp / "config.yaml", "seed: 1\nlogging:\n  level: WARNING\n")
    write(in_tmp / ".env", "RANDOM_SEED=2\nLOG_LEVEL=debug\n")
    config = load_config("config.yaml")
    assert config.seed == 2
    assert config.logging.level == "DEBUG"  # LOG_LEVEL is case-insensitive
    config = load_config("config.yaml", overrides=["seed=3", "logging.level=ERROR"])
    assert (config.seed, config.logging.level) == (3, "ERROR")
    assert load_config("config.yaml", env=False).seed == 1  # env=False: no .env, no environ


def test_environment_beats_dotenv_and_set_beats_environment(in_tmp, monkeypatch):
    write(in_tmp / "config.yaml", "seed: 1\n")
    write(in_tmp / ".env", "RANDOM_SEED=2\n")
    monkeypatch.setenv("RANDOM_SEED", "5")
    assert load_config("config.yaml").seed == 5
    assert load_config("config.yaml", overrides=["seed=6"]).seed == 6


def test_dotenv_next_to_the_config_file_is_read_from_any_cwd(tmp_path, monkeypatch):
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    write(conf_dir / "config.yaml", "seed: 1\n")
    write(conf_dir / ".env", "RANDOM_SEED=4\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_config(conf_dir / "config.yaml").seed == 4


def test_dotenv_in_cwd_with_defaults_only(in_tmp):
    write(in_tmp / ".env", "RANDOM_SEED=9\n")
    assert load_config().seed == 9
    assert load_config(env=False).seed == 0


def test_env_example_is_a_working_dotenv(tmp_path, monkeypatch):
    text = (ROOT / ".env.example").read_text(encoding="utf-8")
    names = set(re.findall(r"^([A-Z_]+)=", text, re.M))
    assert names == set(ENV_KEYS)  # documents exactly the variables that are read
    write(tmp_path / "config.yaml", "seed: 3\nlogging:\n  level: ERROR\n")
    write(tmp_path / ".env", text)
    monkeypatch.chdir(tmp_path)
    config = load_config("config.yaml")
    assert (config.seed, config.logging.level) == (0, "INFO")  # the example's values won


def test_later_override_wins_and_pairs_are_accepted():
    config = load_config(overrides=["finetune.lr=0.1", ("finetune.lr", 0.2)], env=False)
    assert config.finetune.lr == 0.2


# ------------------------------------------------------------------- --set value parsing


@pytest.mark.parametrize("text, key, value", [
    ("finetune.lr=3e-4", "finetune.lr", 3e-4),  # YAML 1.1 would read '3e-4' as a string
    ("runner.seeds=[0,1,2]", "runner.seeds", [0, 1, 2]),
    ("runner.strategies=[bitfit, full_finetune]", "runner.strategies",
     ["bitfit", "full_finetune"]),
    ("task.target=tagging", "task.target", "tagging"),
    ("runner.progress=false", "runner.progress", False),
    ("strategies.gradual_unfreeze.decay=2", "strategies.gradual_unfreeze.decay", 2),
    ("runner.output=a=b.json", "runner.output", "a=b.json"),  # split at the first '='
])
def test_parse_override(text, key, value):
    assert parse_override(text) == (key, value)


def test_set_lists_reach_the_config():
    config = load_config(overrides=["runner.seeds=[0,1,2]", "runner.sweep_values=[0, 1]",
                                    "runner.strategies=[bitfit, all]"], env=False)
    assert config.runner.seeds == (0, 1, 2)
    assert config.runner.sweep_values == (0.0, 1.0)
    assert all(isinstance(v, float) for v in config.runner.sweep_values)
    # "all" expands in place, without repeating bitfit
    assert config.runner.strategies == ("bitfit",) + tuple(
        name for name in STRATEGY_NAMES if name != "bitfit")


def test_ints_are_accepted_for_floats():
    config = load_config(overrides=["finetune.lr=1"], env=False)
    assert config.finetune.lr == 1.0 and type(config.finetune.lr) is float


@pytest.mark.parametrize("text, message", [
    ("finetune.lr", "--set 'finetune.lr': expected section.key=value, e.g. finetune.lr=3e-4"),
    ("=1", "--set '=1': expected section.key=value, e.g. finetune.lr=3e-4"),
    ("finetune..lr=1", "--set 'finetune..lr=1': expected section.key=value, "
                       "e.g. finetune.lr=3e-4"),
    ("runner.seeds=[0,1", "--set 'runner.seeds=[0,1': the value is not valid YAML "
                          "(expected ',' or ']', but got '<stream end>')"),
])
def test_malformed_set(text, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[text], env=False)
    assert str(err.value) == message


# ----------------------------------------------------------------------- error messages


BAD_VALUES = [
    ("model:\n  n_layers: 3\n",
     "config.yaml: unknown key 'model.n_layers' (did you mean 'n_layer'?)"),
    ("modle:\n  n_layer: 3\n",
     "config.yaml: unknown section 'modle' (did you mean 'model'?)"),
    ("model:\n  zzz: 1\n",
     "config.yaml: unknown key 'model.zzz' (known: n_layer, n_head, n_embd, block_size, "
     "dropout, dtype)"),
    ("strategies:\n  gradual_unfrezee:\n    decay: 2\n",
     "config.yaml: unknown key 'strategies.gradual_unfrezee' (did you mean 'gradual_unfreeze'?)"),
    ("finetune:\n  lr: -1\n", "config.yaml: finetune.lr must be > 0, got -1.0"),
    ("finetune:\n  lr: abc\n", "config.yaml: finetune.lr must be a number, got str 'abc'"),
    ("finetune:\n  lr:\n", "config.yaml: finetune.lr must be a number, got nothing (null)"),
    ("finetune:\n  lr: .inf\n", "config.yaml: finetune.lr must be a finite number, got inf"),
    ("finetune:\n  steps: 1.5\n", "config.yaml: finetune.steps must be an integer, got float 1.5"),
    ("finetune:\n  steps: true\n", "config.yaml: finetune.steps must be an integer, got bool True"),
    ("finetune:\n  patience: -1\n", "config.yaml: finetune.patience must be >= 0, got -1"),
    ("finetune:\n  layernorm_trainable_when_frozen: 1\n",
     "config.yaml: finetune.layernorm_trainable_when_frozen must be true or false, got int 1"),
    ("finetune:\n  pooling: maen\n",
     "config.yaml: finetune.pooling must be one of cls, last, mean, attention, got 'maen' "
     "(did you mean 'mean'?)"),
    ("model:\n  dtype: flaot32\n",
     "config.yaml: model.dtype must be one of float32, float64, got 'flaot32' "
     "(did you mean 'float32'?)"),
    ("model:\n  dropout: 1\n", "config.yaml: model.dropout must be in [0, 1), got 1.0"),
    ("task:\n  relatedness: 1.5\n", "config.yaml: task.relatedness must be in [0, 1], got 1.5"),
    ("task:\n  target: regression\n",
     "config.yaml: task.target must be one of topic, binary, tagging, score, got 'regression'"),
    ("strategies:\n  sparse_mask:\n    keep_fraction: 0\n",
     "config.yaml: strategies.sparse_mask.keep_fraction must be in (0, 1], got 0.0"),
    ("runner:\n  seeds: [0, x]\n",
     "config.yaml: runner.seeds[1] must be an integer, got str 'x'"),
    ("runner:\n  seeds: 3\n", "config.yaml: runner.seeds must be a list of integers, got int 3"),
    ("runner:\n  seeds: []\n", "config.yaml: runner.seeds must not be empty"),
    ("runner:\n  strategies: [bitfit, adapters]\n",
     "config.yaml: runner.strategies[1] must be one of " + ", ".join(STRATEGY_NAMES)
     + ", all, got 'adapters'"),
    ("runner:\n  sweep_values: [0.5, 2]\n",
     "config.yaml: runner.sweep_values[1] must be in [0, 1], got 2.0"),
    ("runner:\n  output: ''\n", "config.yaml: runner.output must not be empty"),
    ("logging:\n  level: LOUD\n",
     "config.yaml: logging.level must be one of DEBUG, INFO, WARNING, ERROR, got 'LOUD'"),
    ("model: 3\n", "config.yaml: model must be a mapping (section), got int 3"),
    ("seed: {a: 1}\n", "config.yaml: seed must be an integer, got dict {'a': 1}"),
    # rules between two knobs blame the key and the file that set it
    ("model:\n  n_embd: 66\n", "config.yaml: model.n_embd must be a multiple of model.n_head "
                               "(4), got 66"),
    ("task:\n  seq_len: 40\n", "config.yaml: task.seq_len must be <= model.block_size (32), "
                               "got 40"),
]


@pytest.mark.parametrize("text, message", BAD_VALUES)
def test_bad_value_in_the_file(in_tmp, text, message):
    write(in_tmp / "config.yaml", text)
    with pytest.raises(ValueError) as err:  # what callers catch; main.py exits 2 on ConfigError
        load_config("config.yaml")
    assert err.type is ConfigError
    assert str(err.value) == message


@pytest.mark.parametrize("text, message", [
    ("model:\n  n_layer: 2\n   n_head: 4\n",
     "config.yaml: malformed YAML at line 3, column 10: mapping values are not allowed here"),
    ("model:\n  n_head: [4\n",
     "config.yaml: malformed YAML at line 3, column 1: expected ',' or ']', "
     "but got '<stream end>'"),
    ("finetune:\n  lr: 0.1\n  lr: 0.2\n",
     "config.yaml: malformed YAML at line 3, column 3: duplicate key 'lr'"),
    ("- model\n- task\n", "config.yaml: the top level must be a mapping of sections "
                          "(section: ...), got list"),
    ("just words\n", "config.yaml: the top level must be a mapping of sections "
                     "(section: ...), got str"),
])
def test_bad_file(in_tmp, text, message):
    write(in_tmp / "config.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_config("config.yaml")
    assert str(err.value) == message


def test_missing_file(in_tmp):
    with pytest.raises(ConfigError) as err:
        load_config("nope.yaml")
    assert str(err.value) == "nope.yaml: config file not found"


def test_empty_file_means_defaults(in_tmp):
    write(in_tmp / "config.yaml", "# nothing set yet\n")
    assert load_config("config.yaml") == Config()


def test_errors_name_where_the_value_came_from(in_tmp, monkeypatch):
    write(in_tmp / ".env", "RANDOM_SEED=abc\n")
    with pytest.raises(ConfigError) as err:
        load_config()
    assert str(err.value) == (f"{in_tmp / '.env'} (RANDOM_SEED): seed must be an integer, "
                              "got str 'abc'")

    (in_tmp / ".env").unlink()
    monkeypatch.setenv("LOG_LEVEL", "chatty")
    with pytest.raises(ConfigError) as err:
        load_config(env=True, overrides=["seed=1"])
    assert str(err.value) == ("environment (LOG_LEVEL): logging.level must be one of DEBUG, "
                              "INFO, WARNING, ERROR, got 'CHATTY'")

    with pytest.raises(ConfigError) as err:
        load_config(overrides=["finetune.lr=-1"], env=False)
    assert str(err.value) == "--set: finetune.lr must be > 0, got -1.0"

    # a rule between two keys names the layer that set the later of the two
    write(in_tmp / "config.yaml", "model:\n  n_embd: 66\n")
    with pytest.raises(ConfigError) as err:
        load_config("config.yaml", overrides=["model.n_head=8"], env=False)
    assert str(err.value) == "--set: model.n_embd must be a multiple of model.n_head (8), got 66"
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["model.n_head=5"], env=False)  # n_embd is the default 64
    assert str(err.value) == "--set: model.n_embd must be a multiple of model.n_head (5), got 64"


def test_every_message_is_one_line(in_tmp):
    for text, _ in BAD_VALUES:
        write(in_tmp / "config.yaml", text)
        with pytest.raises(ConfigError) as err:
            load_config("config.yaml")
        assert "\n" not in str(err.value)


# ----------------------------------------------------------------- replace_in and hashing


def test_replace_in_returns_a_new_validated_config():
    config = Config()
    changed = replace_in(config, "task.relatedness", 0.25)
    assert changed.task.relatedness == 0.25
    assert config.task.relatedness == 1.0  # the original is untouched
    assert dataclasses.replace(changed, task=config.task) == config  # nothing else moved
    assert replace_in(config, "strategies.sparse_mask.keep_fraction", 1).strategies \
        .sparse_mask.keep_fraction == 1.0
    with pytest.raises(ConfigError, match=r"^replace_in: task.relatedness must be in \[0, 1\], "
                                          r"got 2.0$"):
        replace_in(config, "task.relatedness", 2)
    with pytest.raises(ConfigError, match="did you mean 'relatedness'"):
        replace_in(config, "task.relatednes", 0.5)


def test_config_hash_is_canonical_json_sha256():
    d = {"b": [1, 2], "a": 1}
    assert config_hash(d) == hashlib.sha256(b'{"a":1,"b":[1,2]}').hexdigest()
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash(d)  # key order does not matter


def test_config_hash_is_stable_and_sensitive():
    model = Config().to_dict()["model"]
    assert config_hash(model) == config_hash(load_config(SHIPPED, env=False).to_dict()["model"])
    assert config_hash(model) == config_hash(Config().model)  # a dataclass works too
    for key, value in [("model.n_layer", 3), ("model.dropout", 0.2), ("model.dtype", "float64")]:
        other = replace_in(Config(), key, value).to_dict()["model"]
        assert config_hash(other) != config_hash(model), key
    # a knob outside the hashed section does not change the key
    assert config_hash(replace_in(Config(), "finetune.lr", 0.5).to_dict()["model"]) == \
        config_hash(model)


# ---------------------------------------------------------------------------- the docs


def test_docs_mention_every_knob():
    text = DOC.read_text(encoding="utf-8")
    missing = [key for key in sorted(leaf_keys(Config().to_dict()))
               if key.rsplit(".", 1)[-1] not in text]
    assert not missing, f"docs/configuration.md does not mention {missing}"


def test_docs_snippet_runs_from_anywhere(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert blocks, "docs/configuration.md has no python snippet"
    env = {k: v for k, v in os.environ.items() if k not in ("RANDOM_SEED", "LOG_LEVEL")}
    env["PYTHONPATH"] = str(ROOT / "src")
    for code in blocks:
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
