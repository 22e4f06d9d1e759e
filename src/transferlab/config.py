"""Configuration: config.yaml + .env + command line -> one validated, frozen `Config`.

Four layers, each overriding the one before it (docs/configuration.md):

    dataclass defaults  <  config.yaml  <  .env / environment  <  --set section.key=value

Every knob is a dataclass field declared with `knob(default, doc, **rules)` (knobs.py).
The rules sit next to the field (`gt=0`, `ge=0, lt=1`, `choices=...`), and one small
walker (`_check_section`) checks any mapping against any of these dataclasses, each value
with `knobs.check_value`. The `model` and `task` sections are not declared here: they are
made (`section_of`) from the fields of model.GPTConfig and tasks.TaskSpec, which declare
those knobs and check them with the same function, and their rules between two knobs
join CROSS_CHECKS. The new head's knobs in `finetune` and `strategies.lora.dropout` are
GPTConfig's too, taken one by one (`knob_of`). So adding a knob is one line in the
dataclass it belongs to and one commented line in config.yaml, never a new `if`.

A bad value raises `ConfigError` with one line that names where the value came from and
its dotted key:

    config.yaml: finetune.lr must be > 0, got -1.0
    config.yaml: unknown key 'model.n_layers' (did you mean 'n_layer'?)

    config = load_config("config.yaml", overrides=["finetune.lr=3e-4"])
    config.finetune.lr                                   # 0.0003
    swept = replace_in(config, "task.relatedness", 0.5)  # a new, validated Config
"""
import dataclasses
import difflib
import hashlib
import json
import os
import re
import typing
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .kernels import KERNELS
from .knobs import Rule, check_value, knob, show
from .lora import TARGETS as LORA_TARGETS
from .model import GPTConfig
from .schedules import CONFIGURABLE as SCHEDULE_NAMES
from .strategies import STRATEGIES
from .tasks import TARGET_KINDS, TaskSpec

# The registries this schema reads its choices from, each declared once in its own module.
STRATEGY_NAMES = tuple(STRATEGIES)  # "all" in runner.strategies (or `--strategy all`) = these
TASK_TARGETS = TARGET_KINDS

# The environment variables we read, and the config key each one sets.
ENV_KEYS = {"RANDOM_SEED": "seed", "LOG_LEVEL": "logging.level"}


class ConfigError(ValueError):
    """A configuration problem, explained in one line that names the file and the key."""


def section(cls):
    """A nested section: a field whose value is another config dataclass."""
    return field(default_factory=cls)


def _expand_all(names):
    """runner.strategies: "all" stands for every strategy; drop repeats, keep the order."""
    expanded = []
    for name in names:
        for one in STRATEGY_NAMES if name == "all" else (name,):
            if one not in expanded:
                expanded.append(one)
    return tuple(expanded)


def knob_of(cls, name, default=dataclasses.MISSING):
    """The knob `name` that the dataclass `cls` declares, for a config section: the same
    doc and rules, and the same default unless `default` gives the section its own.

        pooling: str = knob_of(GPTConfig, "pooling", default="cls")
    """
    declared, = (f for f in dataclasses.fields(cls) if f.name == name)
    if default is dataclasses.MISSING:
        default = declared.default
    return field(default=default, metadata=declared.metadata)


def section_of(cls, name, doc, names, more=()):
    """A config section made of the knobs `names` of the dataclass `cls` (in that order),
    each with the type, default, doc and rules declared there, then the knobs `more`
    ((name, type, knob) triples). The domain class stays the one declaration of each knob."""
    types = typing.get_type_hints(cls)
    fields = [(n, types[n], knob_of(cls, n)) for n in names]
    return _make_section(name, doc, fields + list(more))


def _make_section(name, doc, fields, bases=()):
    """A frozen dataclass named `name`, defined in this module (make_dataclass's fields)."""
    return dataclasses.make_dataclass(name, fields, bases=bases, frozen=True,
                                      namespace={"__doc__": doc, "__module__": __name__})


# ---------------------------------------------------------------------------- the schema
# The defaults are the values shipped in config.yaml (a test holds them equal).


ModelConfig = section_of(
    GPTConfig, "ModelConfig",
    "The GPT-2 backbone: model.GPTConfig's backbone knobs. vocab_size is not a knob: the task "
    "decides it.",
    names=["n_layer", "n_head", "n_embd", "block_size", "dropout", "dtype"])


TaskConfig = section_of(
    TaskSpec, "TaskConfig",
    "The synthetic source (language modelling) and target tasks: tasks.TaskSpec's knobs "
    "(its seed is Config.seed), and which target.",
    names=[f.name for f in dataclasses.fields(TaskSpec) if f.name != "seed"],
    more=[("target", str, knob("topic", "which target task", choices=TASK_TARGETS))])


@dataclass(frozen=True)
class DataConfig:
    """Your own text instead of the synthetic tasks (data.py, docs/own_data.md)."""
    labelled: str = knob("", "labelled JSONL file (--data); empty = the synthetic tasks")
    source: str = knob("", "raw text to pretrain on and to measure forgetting on: a .txt file "
                           "or a folder of them (--source)")
    model: str = knob("", "a Hugging Face GPT-2 folder (--model): its tokenizer and weights are "
                          "the backbone, nothing is pretrained")
    max_len: int = knob(32, "tokens per labelled example (longer ones are cut) and per source "
                            "window", ge=2)
    truncate: str = knob("right", "which end of a long example is cut: right keeps its start, "
                                  "left keeps its end", choices=("right", "left"))
    fractions: tuple[float, ...] = knob((0.7, 0.1, 0.2), "train, val, test shares of the seeded "
                                        "stratified split (files without a split field)", gt=0)
    source_val_fraction: float = knob(0.1, "share of the source windows held out (never "
                                           "pretrained on; the forgetting measure)", gt=0, lt=1)
    source_val_max: int = knob(200, "at most this many held-out source windows", ge=1)


@dataclass(frozen=True)
class TrainingConfig:
    """The knobs of one training run (train.train reads them), declared once.

    Pretraining and fine-tuning are both training runs: their sections (PretrainConfig,
    FinetuneConfig) are this one with other defaults, built by `with_defaults`.
    """
    steps: int = knob(300, "optimizer steps", ge=1)
    batch_size: int = knob(16, "examples per step", ge=1)
    lr: float = knob(3e-4, "peak learning rate (strategies scale it)", gt=0)
    weight_decay: float = knob(0.01, "AdamW decoupled weight decay (2-D weights only)", ge=0)
    grad_clip: float = knob(1.0, "clip the global gradient norm to this", gt=0)
    eval_every: int = knob(25, "steps between validation evaluations", ge=1)
    schedule: str = knob("warmup_cosine", "learning-rate schedule of strategies that do not "
                                          "bring their own", choices=SCHEDULE_NAMES)
    warmup_steps: int = knob(10, "warmup_cosine: linear warmup steps", ge=0)
    plateau_patience: int = knob(2, "plateau: evaluations without improvement before the "
                                    "rate drops", ge=0)
    plateau_factor: float = knob(0.5, "plateau: the rate is multiplied by this", gt=0, lt=1)
    patience: int = knob(4, "early stopping after this many evaluations without "
                            "improvement; 0 = off", ge=0)
    optimizer: str = knob("adamw", "optimizer", choices=("adamw", "sgd"))
    momentum: float = knob(0.9, "SGD momentum", ge=0, lt=1)
    layernorm_trainable_when_frozen: bool = knob(False, "keep LayerNorms of frozen blocks "
                                                        "trainable (fastai does)")
    batch_threads: int = knob(1, "run each step on this many parts of the batch, one thread "
                                 "each (model.GPT's batch_threads); other values add the "
                                 "parts' gradients, so the numbers differ in float rounding",
                              ge=1)
    batch_processes: int = knob(1, "or on this many parts, one process each (model.GPT's "
                                   "batch_processes: the first part in the training "
                                   "process, the others in worker processes); the numbers "
                                   "equal batch_threads' bit for bit", ge=1)
    kernels: str = knob("fast", "the layer functions every forward and backward runs "
                                "(model.GPT's kernels): fast (the chunked and tiled forms) or "
                                "plain (layers.py's equations); the numbers differ in float "
                                "rounding", choices=tuple(KERNELS))


def own_rate(config, strategy: str) -> float:
    """strategies.lr.<strategy>: the strategy's own fine-tuning rate, 0.0 when it has none
    (then finetune.lr applies)."""
    return getattr(config.strategies.lr, strategy, 0.0)


def finetune_for(config, strategy: str):
    """The finetune section with the strategy's own rate when strategies.lr sets one."""
    own = own_rate(config, strategy)
    return dataclasses.replace(config.finetune, lr=own) if own else config.finetune


def lr_knob(config, strategy: str) -> str:
    """The knob that sets a strategy's fine-tuning rate (finetune_for): its own
    strategies.lr.<name>, or finetune.lr when that is 0."""
    return f"strategies.lr.{strategy}" if own_rate(config, strategy) else "finetune.lr"


def with_defaults(cls, name, doc, **defaults):
    """A subclass of the dataclass `cls` whose knobs keep their docs and rules but start
    at other defaults: one declaration of each knob serves several sections."""
    fields = [(f.name, f.type, field(default=defaults.pop(f.name), metadata=f.metadata))
              for f in dataclasses.fields(cls) if f.name in defaults]
    if defaults:
        raise TypeError(f"{name}: {cls.__name__} has no knob {', '.join(defaults)}")
    return _make_section(name, doc, fields, bases=(cls,))


PretrainConfig = with_defaults(
    TrainingConfig, "PretrainConfig",
    "Language-model pretraining on the source task (done once, then cached).",
    steps=3000, batch_size=64, lr=3e-3, warmup_steps=50, weight_decay=0.1, eval_every=500,
    patience=0)


@dataclass(frozen=True)
class FinetuneConfig(TrainingConfig):
    """Training on the target task: the training knobs (TrainingConfig's defaults), and the
    new head's knobs, which model.GPTConfig declares (the target model's config is made
    from them, runner.target_model). Shared by every strategy."""
    pooling: str = knob_of(GPTConfig, "pooling", default="cls")
    # Not GPTConfig.causal, whose None means "causal for the LM head only": a target head is
    # told which mask, in words; runner.target_model sets causal=(attention == "causal")
    attention: str = knob("causal", "attention mask of the target heads",
                          choices=("causal", "bidirectional"))
    label_smoothing: float = knob_of(GPTConfig, "label_smoothing")
    head_hidden: int = knob_of(GPTConfig, "head_hidden")


@dataclass(frozen=True)
class HeadFinetuneConfig:
    backbone_lr_multiplier: float = knob(0.1, "backbone LR = this x the head LR", ge=0)


@dataclass(frozen=True)
class GradualUnfreezeConfig:
    decay: float = knob(2.6, "each lower block group trains at the rate above / decay", gt=0)
    phases: int = knob(0, "unfreezing phases; 0 = one phase per block group", ge=0)


@dataclass(frozen=True)
class DiscriminativeLRConfig:
    decay: float = knob(2.6, "each lower block group trains at the rate above / decay", gt=0)
    cut_frac: float = knob(0.1, "slanted triangular LR: fraction of steps spent rising",
                           gt=0, lt=1)
    ratio: float = knob(32.0, "slanted triangular LR: peak / lowest rate", ge=1)


@dataclass(frozen=True)
class FreezeThenUnfreezeConfig:
    unfreeze_at_iteration: int = knob(100, "step at which the backbone unfreezes", ge=0)
    unfreeze_lr_multiplier: float = knob(0.1, "backbone LR after unfreezing = this x base", ge=0)
    head_lr_multiplier: float = knob(1.0, "head LR = this x base", gt=0)


@dataclass(frozen=True)
class SparseMaskConfig:
    keep_fraction: float = knob(0.05, "fraction of weights that train (Fisher top-k)", gt=0, le=1)
    fisher_batches: int = knob(8, "batches used to estimate the Fisher information", ge=1)


@dataclass(frozen=True)
class LoraConfig:
    """The adapters the lora strategy attaches (lora.attach), which records them in the
    model's GPTConfig as lora_r, lora_alpha and lora_dropout."""
    # r and alpha are not GPTConfig.lora_r and lora_alpha: those describe the adapters a
    # model holds, 0 for none; the strategy always attaches some, so r >= 1 and alpha > 0
    r: int = knob(8, "rank of each adapter (PEFT's r)", ge=1)
    alpha: float = knob(16.0, "the update is scaled by alpha / r (PEFT's lora_alpha)", gt=0)
    dropout: float = knob_of(GPTConfig, "lora_dropout")
    targets: tuple[str, ...] = knob(("attn.c_attn",), "the linear modules that get adapters "
                                    "(PEFT's target_modules for GPT-2)", choices=LORA_TARGETS,
                                    nonempty=True)


@dataclass(frozen=True)
class UlmfitConfig:
    lm_steps: int = knob(100, "steps of LM fine-tuning on the target's own (unlabelled) text "
                              "before the classifier (then as gradual_unfreeze)", ge=1)


@dataclass(frozen=True)
class AuxLMConfig:
    weight: float = knob(0.5, "lambda in L = L_task + lambda * L_LM (GPT-1 used 0.5)", gt=0)


# Each strategy's own fine-tuning rate, one knob per registered strategy (0 = finetune.lr),
# as `python src/main.py --strategy all --seeds 0 1 2 --sweep lr` chose them on the
# validation split (docs/results.md#learning-rates); config.yaml ships the same values.
SWEPT_LR = {"scratch": 0.003, "feature_extractor": 0.001, "head_finetune": 0.0003, "full_finetune": 0.0001, "gradual_unfreeze": 0.001, "discriminative_lr": 0.001, "freeze_then_unfreeze": 0.0003, "bitfit": 0.0001, "sparse_mask": 0.0003, "lora": 0.0003, "ulmfit": 0.0001, "aux_lm": 0.0003}
LearningRatesConfig = _make_section(
    "LearningRatesConfig", "Each strategy's own fine-tuning rate (0 = finetune.lr).",
    [(name, float, knob(SWEPT_LR.get(name, 0.0), f"{name}'s fine-tuning rate; 0 = finetune.lr", ge=0))
     for name in STRATEGIES])


@dataclass(frozen=True)
class StrategiesConfig:
    """The knobs that belong to one strategy each (strategies.py)."""
    lr: LearningRatesConfig = section(LearningRatesConfig)
    head_finetune: HeadFinetuneConfig = section(HeadFinetuneConfig)
    gradual_unfreeze: GradualUnfreezeConfig = section(GradualUnfreezeConfig)
    discriminative_lr: DiscriminativeLRConfig = section(DiscriminativeLRConfig)
    freeze_then_unfreeze: FreezeThenUnfreezeConfig = section(FreezeThenUnfreezeConfig)
    sparse_mask: SparseMaskConfig = section(SparseMaskConfig)
    lora: LoraConfig = section(LoraConfig)
    ulmfit: UlmfitConfig = section(UlmfitConfig)
    aux_lm: AuxLMConfig = section(AuxLMConfig)


@dataclass(frozen=True)
class RunnerConfig:
    """What to run and where the results go."""
    strategies: tuple[str, ...] = knob(STRATEGY_NAMES, 'strategies to compare; "all" = every one',
                                       choices=STRATEGY_NAMES + ("all",), nonempty=True,
                                       expand=_expand_all)
    seeds: tuple[int, ...] = knob((0,), "one fine-tuning run per seed", ge=0, nonempty=True)
    output: str = knob("results.json", "results JSON file", nonempty=True)
    cache_dir: str = knob("cache", "where the pretrained model is cached", nonempty=True)
    plot: str = knob("", "learning-curve / sweep plot; empty: output's path with .png")
    progress: bool = knob(True, "show progress while training")
    jobs: int = knob(1, "worker processes for the independent runs (one BLAS thread each); "
                        "1 = every run in this process", ge=1)
    lr_values: tuple[float, ...] = knob((1e-4, 3e-4, 1e-3, 3e-3), "learning rates for --sweep lr "
                                        "(each strategy's rate is then chosen on the validation split)",
                                        gt=0, nonempty=True)
    sweep_values: tuple[float, ...] = knob((0.0, 0.25, 0.5, 0.75, 1.0),
                                           "task.relatedness values for --sweep relatedness",
                                           ge=0, le=1, nonempty=True)


@dataclass(frozen=True)
class LoggingConfig:
    level: str = knob("INFO", "console log level (LOG_LEVEL overrides)",
                      choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    file: str = knob("logs/transferlab.log", "rotating log file", nonempty=True)
    max_bytes: int = knob(1_000_000, "rotate the log file at this size; 0 = never", ge=0)
    backup_count: int = knob(3, "rotated log files kept", ge=0)


@dataclass(frozen=True)
class Config:
    """The whole configuration. Frozen: derive a changed copy with `replace_in`."""
    seed: int = knob(0, "master seed (RANDOM_SEED overrides)", ge=0)
    model: ModelConfig = section(ModelConfig)
    task: TaskConfig = section(TaskConfig)
    data: DataConfig = section(DataConfig)
    pretrain: PretrainConfig = section(PretrainConfig)
    finetune: FinetuneConfig = section(FinetuneConfig)
    strategies: StrategiesConfig = section(StrategiesConfig)
    runner: RunnerConfig = section(RunnerConfig)
    logging: LoggingConfig = section(LoggingConfig)

    def to_dict(self):
        """A plain dict of plain values (tuples become lists), ready for json.dumps."""
        return _plain(self)


# Rules that tie two knobs together (knobs.Rule), checked on the finished Config: the ones
# the model and task sections bring from their domain classes, and the one between them.
# The message names the layer that set the later of the two keys.
CROSS_CHECKS = (
    *(rule.within("model") for rule in GPTConfig.RULES),
    Rule("task.seq_len", "model.block_size", lambda c: c.task.seq_len <= c.model.block_size,
         lambda c, name: f"<= model.block_size ({c.model.block_size})"),
    *(rule.within("task") for rule in TaskSpec.RULES),
    Rule("data.source", "data.labelled", lambda c: c.data.source or not c.data.labelled,
         lambda c, name: "a text file or folder (--source) with data.labelled: the text to "
                         "pretrain on and to measure forgetting on"),
    Rule("data.labelled", "data.model", lambda c: c.data.labelled or not (c.data.model or c.data.source),
         lambda c, name: "a labelled JSONL file (--data) with data.source or data.model"),
    Rule("data.max_len", "model.block_size",
         lambda c: not c.data.labelled or c.data.model or c.data.max_len <= c.model.block_size,
         lambda c, name: f"<= model.block_size ({c.model.block_size})"),
    *(Rule(f"{section}.batch_processes", f"{section}.batch_threads",
           lambda c, section=section: (getattr(c, section).batch_processes == 1
                                       or getattr(c, section).batch_threads == 1),
           lambda c, name, section=section: f"1 while {name(section + '.batch_threads')} is "
                                            f"above 1 (parts in threads or in processes, "
                                            f"not both)")
      for section in ("pretrain", "finetune")),
    Rule("data.fractions", "data.fractions",
         lambda c: len(c.data.fractions) == 3 and abs(sum(c.data.fractions) - 1) < 1e-9,
         lambda c, name: "three numbers (train, val, test) that sum to 1"),
)


# ------------------------------------------------------------------------------- loading


def load_config(path=None, overrides=(), env=True):
    """Build the Config: defaults < the YAML file < .env and environment < overrides.

    path: a YAML file, or None for the defaults alone.
    overrides: "section.key=value" strings (value parsed as YAML, like --set) or
        (dotted key, value) pairs.
    env: read RANDOM_SEED and LOG_LEVEL from a `.env` file (next to the config file,
        else in the current directory) and from the real environment, which wins.
    Raises ConfigError, one line naming the file (or --set) and the dotted key.
    """
    layers = []  # (where the values came from, nested dict of values), lowest first
    if path is not None:
        layers.append((str(path), _read_yaml_file(path)))
    if env:
        layers.extend(_env_layers(path))
    for item in overrides:
        if isinstance(item, str):
            key, value = parse_override(item)
            layers.append(("--set", _nest(key, value)))
        else:
            key, value = item
            layers.append(("command line", _nest(key, value)))
    return _build_from_layers(layers)


def replace_in(config, key, value):
    """A new, validated Config equal to `config` except at dotted `key`.

        replace_in(config, "task.relatedness", 0.25)
    """
    return _build_from_layers([("replace_in", config.to_dict()),
                               ("replace_in", _nest(key, value))])


def config_hash(d):
    """sha256 hex digest of canonical JSON of a (sub-)config: same values, same hash.

    Accepts a dict or a config dataclass, e.g. config_hash(config.to_dict()["model"]).
    Used to key the pretrained-model cache: change any knob in it and the key changes.
    """
    text = json.dumps(_plain(d), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def parse_override(text):
    """'finetune.lr=3e-4' -> ('finetune.lr', 0.0003). The value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key):
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. finetune.lr=3e-4")
    try:
        value = yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML "
                          f"({_one_line(getattr(err, 'problem', None) or err)})") from None
    return key, value


class _Loader(yaml.SafeLoader):
    """SafeLoader with two fixes for config files.

    - `3e-4` is a float (YAML 1.2). YAML 1.1, which PyYAML follows, wants `3.0e-4` and
      would hand us the string '3e-4'.
    - A key written twice in one mapping is an error, not "the last one silently wins".
    """

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            if isinstance(key, Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _read_yaml_file(path):
    """The file's top-level mapping ({} for an empty file); one-line ConfigError otherwise."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read config file: {_one_line(err)}") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: malformed YAML{where}: "
                          f"{_one_line(err.problem or err.context)}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: malformed YAML: {_one_line(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of sections "
                          f"(section: ...), got {type(data).__name__}")
    return data


def _env_layers(config_path):
    """Layers from the .env file and the real environment (RANDOM_SEED, LOG_LEVEL)."""
    from dotenv import dotenv_values  # python-dotenv reads the file, we map the names

    candidates = [Path(config_path).parent / ".env"] if config_path is not None else []
    candidates.append(Path.cwd() / ".env")
    sources = []
    for env_file in candidates:
        if env_file.is_file():
            try:
                sources.append((str(env_file), dotenv_values(env_file, encoding="utf-8")))
            except UnicodeDecodeError as err:
                raise ConfigError(f"{env_file}: not UTF-8 text (byte 0x{err.object[err.start]:02x} "
                                  f"at offset {err.start}); save the .env file as UTF-8") from None
            except OSError as err:
                raise ConfigError(f"{env_file}: cannot read the .env file: {_one_line(err)}") from None
            break  # the first .env found is the one used
    sources.append(("environment", os.environ))  # real variables beat the .env file

    layers = []
    for origin, variables in sources:
        for name, key in ENV_KEYS.items():
            raw = variables.get(name)
            if raw is None or raw.strip() == "":
                continue
            if name == "LOG_LEVEL":
                raw = raw.strip().upper()  # LOG_LEVEL=debug means DEBUG
            try:
                value = yaml.load(raw, Loader=_Loader)
            except yaml.YAMLError:
                value = raw  # leave it to the type check to explain
            layers.append((f"{origin} ({name})", _nest(key, value)))
    return layers


# ------------------------------------------------------------------------- the walker


def _build_from_layers(layers):
    """Check each layer against the schema, merge them in order, build the Config."""
    merged, origin = {}, {}  # origin: dotted key -> (layer number, where), for messages
    for number, (where, data) in enumerate(layers):
        checked = _check_section(Config, data, where, prefix="")
        _merge(merged, checked, origin, (number, where), prefix="")
    config = _construct(Config, merged)
    for rule in CROSS_CHECKS:
        message = rule.broken(config)
        if message:
            _, where = max(origin.get(rule.key, (-1, "defaults")),
                           origin.get(rule.other, (-1, "defaults")))
            raise ConfigError(f"{where}: {message}")
    return config


def _check_section(cls, data, where, prefix):
    """Check a mapping against dataclass `cls`; return the checked values it sets."""
    if not isinstance(data, Mapping):
        what = "the top level" if not prefix else prefix.rstrip(".")
        raise ConfigError(f"{where}: {what} must be a mapping (section), got {show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    types = typing.get_type_hints(cls)
    checked = {}
    for name, value in data.items():
        name = str(name)
        key = prefix + name
        if name not in fields:
            raise ConfigError(f"{where}: {_unknown(name, key, fields, at_top=not prefix)}")
        if dataclasses.is_dataclass(types[name]):
            checked[name] = _check_section(types[name], value, where, key + ".")
        else:
            checked[name] = _check_value(value, types[name], fields[name].metadata, where, key)
    return checked


def _check_value(value, type_, rules, where, key):
    """Check one value against its knob's rules (knobs.check_value); name where it came from."""
    try:
        return check_value(value, type_, rules, key)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def _unknown(name, key, fields, at_top):
    """"unknown key 'model.n_layers' (did you mean 'n_layer'?)", or list the known ones."""
    what = "section" if at_top else "key"
    close = difflib.get_close_matches(name, list(fields), n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(fields)}"
    return f"unknown {what} {key!r} ({hint})"


def _merge(into, checked, origin, source, prefix):
    """Deep-merge checked values into `into`, noting the source of each leaf."""
    for name, value in checked.items():
        if isinstance(value, dict):
            _merge(into.setdefault(name, {}), value, origin, source, prefix + name + ".")
        else:
            into[name] = value
            origin[prefix + name] = source


def _construct(cls, values):
    """The dataclass from checked values; anything not given keeps its default."""
    types = typing.get_type_hints(cls)
    return cls(**{name: _construct(types[name], value) if isinstance(value, dict) else value
                  for name, value in values.items()})


# ------------------------------------------------------------------------------ helpers


def _nest(key, value):
    """'finetune.lr', 3e-4 -> {'finetune': {'lr': 3e-4}}."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def _plain(obj):
    """Dataclasses -> dicts, tuples -> lists, recursively (JSON-able)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _one_line(err):
    return " ".join(str(err).split())
