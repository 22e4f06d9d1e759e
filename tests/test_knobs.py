"""knobs.py: each knob declared once and checked by one function.

The task and model knobs are declared by the domain dataclasses (tasks.TaskSpec,
model.GPTConfig); config.py makes its `task` and `model` sections from them, takes the
new head's knobs (`finetune.pooling`, `label_smoothing`, `head_hidden`) and
`strategies.lora.dropout` from GPTConfig, and the runner builds them back from a config.
These tests hold the pieces together: one set of defaults (config.yaml's), one rule per
knob in the same words from Python and from a config file, and a runner that hands the
configured values on unchanged.
"""
import dataclasses
import typing
from pathlib import Path

import numpy as np
import pytest
import yaml

from transferlab import lora
from transferlab import runner as R
from transferlab import strategies as S
from transferlab.config import (Config, ConfigError, FinetuneConfig, LoraConfig, ModelConfig,
                                TaskConfig, load_config)
from transferlab.knobs import Rule, check_value
from transferlab.model import GPTConfig
from transferlab.tasks import TaskSpec

SHIPPED = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text("utf-8"))


def defaults(cls):
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


# ------------------------------------------------------------------- one set of defaults


def test_task_spec_defaults_are_the_config_and_the_shipped_file():
    spec = defaults(TaskSpec)
    section = defaults(TaskConfig)
    assert set(spec) - set(section) == {"seed"} and set(section) - set(spec) == {"target"}
    for name in set(spec) & set(section):
        assert spec[name] == section[name] == SHIPPED["task"][name], name
    assert spec["seed"] == Config().seed == SHIPPED["seed"]


def test_gpt_config_backbone_defaults_are_the_config_and_the_shipped_file():
    section = defaults(ModelConfig)
    assert list(section) == list(SHIPPED["model"])  # the file's order, so to_dict keeps it
    for name, value in section.items():
        assert defaults(GPTConfig)[name] == value == SHIPPED["model"][name], name


def test_a_section_keeps_the_doc_and_rules_of_its_declaration():
    for section, cls in ((TaskConfig, TaskSpec), (ModelConfig, GPTConfig)):
        declared = {f.name: f.metadata for f in dataclasses.fields(cls)}
        for f in dataclasses.fields(section):
            if f.name in declared:
                assert f.metadata == declared[f.name], f.name
                assert f.metadata["doc"], f.name


# the knobs a section takes one by one from GPTConfig (config.knob_of): (section, its
# name there, GPTConfig's name)
TAKEN = [(FinetuneConfig, "pooling", "pooling"),
         (FinetuneConfig, "label_smoothing", "label_smoothing"),
         (FinetuneConfig, "head_hidden", "head_hidden"),
         (LoraConfig, "dropout", "lora_dropout")]


@pytest.mark.parametrize("section, name, declared", TAKEN, ids=[n for _, n, _ in TAKEN])
def test_a_knob_taken_from_gpt_config_keeps_its_type_doc_and_rules(section, name, declared):
    field = {f.name: f for f in dataclasses.fields(section)}[name]
    gpt = {f.name: f for f in dataclasses.fields(GPTConfig)}[declared]
    assert field.metadata == gpt.metadata and field.metadata["doc"]
    assert typing.get_type_hints(section)[name] == typing.get_type_hints(GPTConfig)[declared]


def test_the_finetune_and_lora_defaults_are_the_shipped_file():
    finetune, lora_ = defaults(FinetuneConfig), defaults(LoraConfig)
    for name in ("pooling", "attention", "label_smoothing", "head_hidden"):
        assert finetune[name] == SHIPPED["finetune"][name], name
    for name in ("r", "alpha", "dropout"):
        assert lora_[name] == SHIPPED["strategies"]["lora"][name], name
    # the target heads pool at a CLS token; a bare GPTConfig (the LM) keeps "last"
    assert finetune["pooling"] == "cls" and defaults(GPTConfig)["pooling"] == "last"


# --------------------------------------------------- one rule, from Python and from YAML


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Work in an empty directory, so the file is named 'config.yaml' in messages."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def from_yaml(in_tmp, section, changes):
    """The ConfigError message of a config file setting `changes` in `section`."""
    (in_tmp / "config.yaml").write_text(yaml.safe_dump({section: changes}), encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config("config.yaml", env=False)
    return str(err.value)


def from_python(cls, changes):
    with pytest.raises(ValueError) as err:
        cls(**changes) if cls is TaskSpec else cls(vocab_size=25, **changes)
    assert err.type is ValueError  # not a ConfigError: there is no file to name
    return str(err.value)


BAD = [  # (section, values, the rule's words after the key)
    ("task", {"n_tokens": 1}, "n_tokens must be >= 2, got 1"),
    ("task", {"n_topics": True}, "n_topics must be an integer, got bool True"),
    ("task", {"seq_len": 6}, "seq_len must be >= 7, got 6"),
    ("task", {"concentration": 0}, "concentration must be > 0, got 0.0"),
    ("task", {"relatedness": 1.5}, "relatedness must be in [0, 1], got 1.5"),
    ("task", {"n_target_train": 0}, "n_target_train must be >= 1, got 0"),
    ("task", {"min_len": 5}, "min_len must be >= 6, got 5"),
    ("task", {"min_len": 16},  # a rule between two knobs, declared once on TaskSpec
     "min_len must be <= {}seq_len - 1 (15: one slot stays free for a CLS token), got 16"),
    ("task", {"seq_len": 10, "min_len": 10},
     "min_len must be <= {}seq_len - 1 (9: one slot stays free for a CLS token), got 10"),
    ("model", {"n_layer": 0}, "n_layer must be >= 1, got 0"),
    ("model", {"n_head": 2.5}, "n_head must be an integer, got float 2.5"),
    ("model", {"block_size": 0}, "block_size must be >= 1, got 0"),
    ("model", {"dropout": 1}, "dropout must be in [0, 1), got 1.0"),
    ("model", {"dtype": "float16"},
     "dtype must be one of float32, float64, got 'float16' (did you mean 'float64'?)"),
    ("model", {"n_embd": 66},  # declared once on GPTConfig
     "n_embd must be a multiple of {}n_head (4), got 66"),
]


@pytest.mark.parametrize("section, values, words", BAD, ids=[f"{s}-{v}" for s, v, _ in BAD])
def test_a_bad_value_breaks_the_same_rule_from_yaml_and_from_python(in_tmp, section, values,
                                                                    words):
    cls = {"task": TaskSpec, "model": GPTConfig}[section]
    assert from_yaml(in_tmp, section, values) == \
        f"config.yaml: {section}.{words.format(section + '.')}"
    assert from_python(cls, values) == f"{cls.__name__}.{words.format(cls.__name__ + '.')}"


# The knobs finetune and strategies.lora take from GPTConfig, the same rule under two
# names: (dotted key in the file, GPTConfig's field, a bad value, the words after the key)
BAD_TAKEN = [
    ("finetune.pooling", "pooling", "maen",
     "must be one of cls, last, mean, attention, got 'maen' (did you mean 'mean'?)"),
    ("finetune.pooling", "pooling", None, "must be a string, got nothing (null)"),
    ("finetune.label_smoothing", "label_smoothing", 1.5, "must be in [0, 1), got 1.5"),
    ("finetune.label_smoothing", "label_smoothing", -0.1, "must be in [0, 1), got -0.1"),
    ("finetune.head_hidden", "head_hidden", -1, "must be >= 0, got -1"),
    ("finetune.head_hidden", "head_hidden", 8.0, "must be an integer, got float 8.0"),
    ("strategies.lora.dropout", "lora_dropout", 1, "must be in [0, 1), got 1.0"),
    ("strategies.lora.dropout", "lora_dropout", True, "must be a number, got bool True"),
]


@pytest.mark.parametrize("key, declared, value, words", BAD_TAKEN,
                         ids=[f"{k}={v!r}" for k, _, v, _ in BAD_TAKEN])
def test_a_bad_head_or_lora_value_breaks_the_same_rule_from_yaml_and_from_gpt_config(
        in_tmp, key, declared, value, words):
    section, _, inner = key.partition(".")  # "strategies", "lora.dropout"
    changes = value
    for part in reversed(inner.split(".")):
        changes = {part: changes}           # {"lora": {"dropout": value}}
    assert from_yaml(in_tmp, section, changes) == f"config.yaml: {key} {words}"
    assert from_python(GPTConfig, {declared: value}) == f"GPTConfig.{declared} {words}"


def test_the_rule_between_sections_is_the_configs():
    # task.seq_len <= model.block_size spans two sections: config.py declares it
    with pytest.raises(ConfigError, match=r"^--set: task.seq_len must be <= model.block_size \(32\), got 40$"):
        load_config(overrides=["task.seq_len=40"], env=False)
    assert TaskSpec(seq_len=40).seq_len == 40  # a TaskSpec knows no model


def test_numpy_numbers_are_knob_values_in_python():
    spec = TaskSpec(n_tokens=np.int64(24), relatedness=np.float32(0.5))
    assert spec.n_tokens == 24
    assert GPTConfig(vocab_size=np.int64(25), n_layer=np.int64(1)).n_layer == 1
    assert check_value(np.float32(0.5), float, {"ge": 0}, "x") == 0.5


def test_rule_within_names_the_knobs_of_the_outer_object():
    rule = Rule("lo", "hi", lambda o: o.lo <= o.hi, lambda o, name: f"<= {name('hi')} ({o.hi})")
    inner = type("Inner", (), {"lo": 3, "hi": 2})()
    outer = type("Outer", (), {"part": inner})()
    assert rule.broken(inner) == "lo must be <= hi (2), got 3"
    assert rule.within("part").broken(outer) == "part.lo must be <= part.hi (2), got 3"
    inner.hi = 5
    assert rule.within("part").broken(outer) is None


# ----------------------------------------------------------- the runner hands values on


def test_task_spec_of_the_shipped_config_is_the_bare_task_spec():
    assert R.task_spec(Config()) == TaskSpec(seed=0) == TaskSpec()
    assert R.task_spec(load_config(Path(__file__).resolve().parents[1] / "config.yaml",
                                   env=False)) == TaskSpec()


def test_task_spec_and_backbone_config_take_every_configured_value():
    config = load_config(overrides=[
        "seed=3", "task.n_tokens=10", "task.seq_len=20", "task.concentration=0.7",
        "task.relatedness=0.25", "task.min_len=9", "task.n_target_test=40", "task.target=score",
        "model.n_layer=3", "model.n_head=2", "model.n_embd=8", "model.block_size=24",
        "model.dropout=0.1", "model.dtype=float64"], env=False)
    spec = R.task_spec(config)
    assert spec == TaskSpec(n_tokens=10, seq_len=20, concentration=0.7, relatedness=0.25,
                            min_len=9, n_target_test=40, seed=3)
    assert R.backbone_config(config, spec) == GPTConfig(
        vocab_size=11, block_size=24, n_layer=3, n_head=2, n_embd=8, dropout=0.1,
        dtype="float64", head="lm", pad_id=10)


def test_the_target_model_takes_the_head_knobs_and_the_lora_dropout_of_the_config():
    config = load_config(overrides=[
        "finetune.pooling=mean", "finetune.attention=bidirectional",
        "finetune.label_smoothing=0.1", "finetune.head_hidden=8", "strategies.lora.dropout=0.2",
        "model.n_layer=1", "model.n_embd=8", "model.n_head=2"], env=False)
    data = R.experiment_data(config)
    model = R.target_model(config, data, 4, None, seed=0, random_init=True)
    plan = S.build_plan("lora", steps=10, n_layer=1, knobs=config.strategies)
    lora.attach(model, **plan.lora)
    cfg = model.config
    assert (cfg.pooling, cfg.causal, cfg.label_smoothing, cfg.head_hidden, cfg.lora_dropout) == \
        ("mean", False, 0.1, 8, 0.2)
    assert (cfg.lora_r, cfg.lora_alpha) == (config.strategies.lora.r, config.strategies.lora.alpha)
