"""Hugging Face GPT-2 folders in and out: `config.json` + `model.safetensors` <-> our GPT.

    model = load_hf_folder("gpt2")        # a folder the user downloaded themselves
    save_hf_folder(model, "my-gpt2")      # GPT2LMHeadModel.from_pretrained("my-gpt2") reads it

Our parameters already carry GPT2Model's names and its Conv1D [in, out] layout, so the
bridge is a renaming (`transformer.` in front of backbone names), never a transpose. The
work is in refusing what our model does not compute: every GPT-2 setting it does not
implement is rejected by name, and every file problem raises one exception class,
HFFolderError, with one line naming the file and the key or tensor at fault.

Weights are read with `safetensors.safe_open(..., framework="np")`: no pickle, so opening a
downloaded folder cannot run code. `pytorch_model.bin` (a pickle) is never loaded.

Docs: docs/gpt2.md.
"""
from __future__ import annotations

import json
import logging
import os
import re

import numpy as np

from .checkpoint import Checkpoint, atomic_open
from .model import GPT, GPTConfig

__all__ = ["HFFolderError", "config_from_hf", "hf_shapes", "hf_config", "hf_state_dict",
           "load_hf_folder", "load_hf_checkpoint", "save_hf_folder", "weights_path"]

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PICKLE_FILE = "pytorch_model.bin"
SHARD_INDEX = "model.safetensors.index.json"
PREFIX = "transformer."  # GPT2LMHeadModel's name for its GPT2Model
# keys that fix the model's shapes: we never guess them
REQUIRED_KEYS = ("model_type", "vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
# both are 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), the formula of layers.gelu_forward
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop")
# GPT2Config's defaults: what transformers assumes when config.json leaves a key out
HF_DEFAULTS = {
    "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "n_inner": None,
    "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1,
    "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False, "add_cross_attention": False,
    "tie_word_embeddings": True,
}
# switches our model has no code for: (key, the value we implement, what the other value does)
UNSUPPORTED_SWITCHES = (
    ("scale_attn_weights", True, "attention scores not divided by sqrt(head size)"),
    ("scale_attn_by_inverse_layer_idx", False, "attention scores also divided by layer index + 1"),
    ("reorder_and_upcast_attn", False, "attention computed in a reordered, upcast form"),
    ("add_cross_attention", False, "cross-attention layers in every block (encoder-decoder use)"),
)
FLOAT_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64}
# the causal mask GPT-2 checkpoints may carry: buffers, not parameters
BUFFER_RE = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
# our backbone's names inside a block, and their shapes as a function of C (docs/model.md)
BLOCK_SHAPES = (
    ("ln_1.weight", lambda C: (C,)), ("ln_1.bias", lambda C: (C,)),
    ("attn.c_attn.weight", lambda C: (C, 3 * C)), ("attn.c_attn.bias", lambda C: (3 * C,)),
    ("attn.c_proj.weight", lambda C: (C, C)), ("attn.c_proj.bias", lambda C: (C,)),
    ("ln_2.weight", lambda C: (C,)), ("ln_2.bias", lambda C: (C,)),
    ("mlp.c_fc.weight", lambda C: (C, 4 * C)), ("mlp.c_fc.bias", lambda C: (4 * C,)),
    ("mlp.c_proj.weight", lambda C: (4 * C, C)), ("mlp.c_proj.bias", lambda C: (C,)),
)


class HFFolderError(ValueError):
    """A Hugging Face folder or config we cannot use; one line naming the file and the key."""


# ---------------------------------------------------------------------- config.json


def config_from_hf(d: dict, source: str = CONFIG_FILE, dtype: str = "float32",
                   dropout: float | None = None) -> GPTConfig:
    """The GPTConfig of an LM model equal to the GPT-2 that config.json `d` describes.

    n_embd, n_layer, n_head, vocab_size map by name, n_positions -> block_size,
    tie_word_embeddings -> tie_weights. A key config.json leaves out takes GPT2Config's
    default (as transformers would), except the shape keys in REQUIRED_KEYS.

    Dropout: our model has one rate (embeddings, attention, residual). It is the common
    value of resid_pdrop, embd_pdrop and attn_pdrop; when they differ the config is
    refused unless `dropout=` chooses the rate (it only matters for training: the loaded
    model is in eval mode).

    Refused by name (HFFolderError, `source` in the message): a model_type other than
    gpt2, a missing shape key, an activation other than the tanh GELU (gelu_new, or
    gelu_pytorch_tanh which is the same formula), layer_norm_epsilon other than 1e-5,
    n_inner other than null or 4 n_embd, and any of UNSUPPORTED_SWITCHES set.
    See docs/gpt2.md#the-config.
    """
    if not isinstance(d, dict):
        raise HFFolderError(f"{source}: expected a JSON object, got {type(d).__name__}")
    for key in REQUIRED_KEYS:
        if key not in d:
            raise HFFolderError(f"{source}: required key {key!r} is missing")
    if d["model_type"] != "gpt2":
        raise HFFolderError(f"{source}: model_type is {d['model_type']!r}; only 'gpt2' can be loaded")

    def get(key):
        return d.get(key, HF_DEFAULTS.get(key))

    for key in REQUIRED_KEYS[1:]:
        value = d[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise HFFolderError(f"{source}: {key} must be a positive integer, got {value!r}")
    act = get("activation_function")
    if act not in TANH_GELUS:
        raise HFFolderError(f"{source}: activation_function {act!r} is not implemented; "
                            f"transferlab's GPT uses the tanh GELU ({' or '.join(TANH_GELUS)})")
    eps = get("layer_norm_epsilon")
    if eps != 1e-5 or isinstance(eps, bool):
        raise HFFolderError(f"{source}: layer_norm_epsilon {eps!r} is not implemented; "
                            f"transferlab's LayerNorm uses 1e-05")
    n_inner = get("n_inner")
    if n_inner is not None and n_inner != 4 * d["n_embd"]:
        raise HFFolderError(f"{source}: n_inner {n_inner!r} is not implemented; transferlab's MLP "
                            f"is 4 * n_embd = {4 * d['n_embd']} wide (n_inner null)")
    for key, ours, meaning in UNSUPPORTED_SWITCHES:
        if get(key) is not ours:
            raise HFFolderError(f"{source}: {key} is {json.dumps(get(key))}, which transferlab's "
                                f"GPT does not implement ({meaning}); it needs {json.dumps(ours)}")
    tie = get("tie_word_embeddings")
    if not isinstance(tie, bool):
        raise HFFolderError(f"{source}: tie_word_embeddings must be true or false, got {tie!r}")

    rates = {key: get(key) for key in DROPOUT_KEYS}
    for key, rate in rates.items():
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            raise HFFolderError(f"{source}: {key} must be a number in [0, 1), got {rate!r}")
    if dropout is None:
        if len(set(rates.values())) > 1:
            listed = ", ".join(f"{k}={v}" for k, v in rates.items())
            raise HFFolderError(f"{source}: {listed} differ, but transferlab's GPT has one dropout "
                                f"rate; pass dropout=... to choose it")
        dropout = rates["resid_pdrop"]

    try:
        return GPTConfig(vocab_size=d["vocab_size"], block_size=d["n_positions"],
                         n_layer=d["n_layer"], n_head=d["n_head"], n_embd=d["n_embd"],
                         dropout=float(dropout), dtype=dtype, head="lm", tie_weights=tie)
    except ValueError as e:  # e.g. n_embd not divisible by n_head
        raise HFFolderError(f"{source}: {e}") from None


def hf_shapes(config: GPTConfig) -> dict[str, tuple]:
    """Name -> shape of every tensor a GPT-2 folder for `config` holds, without the
    `transformer.` prefix; `lm_head.weight` only for an untied LM head.

    This is the layout of docs/model.md (GPT2Model's names, Conv1D [in, out] weights), so
    the loader can check a whole file before it builds a model.
    """
    V, T, C = config.vocab_size, config.block_size, config.n_embd
    shapes = {"wte.weight": (V, C), "wpe.weight": (T, C)}
    for i in range(config.n_layer):
        for name, shape in BLOCK_SHAPES:
            shapes[f"h.{i}.{name}"] = shape(C)
    shapes["ln_f.weight"] = (C,)
    shapes["ln_f.bias"] = (C,)
    if config.head == "lm" and not config.tie_weights:
        shapes["lm_head.weight"] = (V, C)
    return shapes


# ---------------------------------------------------------------------- loading


def _read_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise HFFolderError(f"{path} is missing (a GPT-2 folder holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise HFFolderError(f"{path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise HFFolderError(f"{path} cannot be read ({e.strerror})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise HFFolderError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def weights_path(folder: str) -> str:
    """The folder's model.safetensors; HFFolderError explains a pickle or sharded folder."""
    path = os.path.join(folder, WEIGHTS_FILE)
    if os.path.isfile(path):
        return path
    if os.path.isfile(os.path.join(folder, PICKLE_FILE)):
        convert = (f"python -c \"from transformers import GPT2LMHeadModel as M; "
                   f"M.from_pretrained('{folder}').save_pretrained('{folder}', safe_serialization=True)\"")
        raise HFFolderError(f"{path} is missing and {PICKLE_FILE} is a pickle file, which transferlab "
                            f"never loads (unpickling can run code); convert it once with: {convert}")
    if os.path.isfile(os.path.join(folder, SHARD_INDEX)):
        raise HFFolderError(f"{path} is missing and {SHARD_INDEX} names a sharded checkpoint, "
                            f"which transferlab does not read; save it as one file")
    raise HFFolderError(f"{path} is missing")


def _read_weights(path: str, config: GPTConfig) -> dict[str, np.ndarray]:
    """Every parameter of `path`, checked and converted to config.dtype: name -> array.

    Shapes and dtypes are checked from the header before a tensor's bytes are read.
    Names are returned without `transformer.`; buffers are skipped; a tied lm_head.weight
    must equal wte.weight (else the file contradicts its config) and is dropped.
    """
    from safetensors import SafetensorError, safe_open

    expected = hf_shapes(config)
    want = np.dtype(config.dtype)
    state, keys, tied_head = {}, {}, None  # keys: our name -> the key in the file
    try:
        with safe_open(path, framework="np") as f:
            for key in f.keys():
                name = key[len(PREFIX):] if key.startswith(PREFIX) else key
                if BUFFER_RE.match(name):
                    continue
                if name in keys:
                    raise HFFolderError(f"{path}: tensors {keys[name]} and {key} are both {name}")
                if name not in expected and not (name == "lm_head.weight" and config.tie_weights):
                    raise HFFolderError(f"{path}: unexpected tensor {key} (not a parameter of a "
                                        f"GPT2LMHeadModel with this config.json)")
                keys[name] = key
                meta = f.get_slice(key)
                kind, shape = meta.get_dtype(), tuple(meta.get_shape())
                if kind not in FLOAT_DTYPES:
                    raise HFFolderError(f"{path}: tensor {key} has dtype {kind}; transferlab reads "
                                        f"{', '.join(FLOAT_DTYPES)} (convert it to float32)")
                want_shape = expected.get(name, expected["wte.weight"])  # a tied head is wte
                if shape != want_shape:
                    raise HFFolderError(f"{path}: tensor {key} has shape {shape}, expected "
                                        f"{want_shape} from {CONFIG_FILE}")
                value = f.get_tensor(key)
                if not np.isfinite(value).all():
                    raise HFFolderError(f"{path}: tensor {key} holds NaN or infinite values")
                if name == "lm_head.weight" and config.tie_weights:
                    tied_head = (key, value)
                else:
                    state[name] = value.astype(want)
    except HFFolderError:
        raise
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise HFFolderError(f"{path} is truncated or corrupt ({type(e).__name__}: {e})") from None

    missing = [name for name in expected if name not in state]
    if missing:
        listed = ", ".join(PREFIX + n if n != "lm_head.weight" else n for n in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise HFFolderError(f"{path}: tensor {listed}{more} missing")
    if tied_head is not None:
        key, value = tied_head
        if not np.array_equal(value.astype(want), state["wte.weight"]):
            raise HFFolderError(f"{path}: tensor {key} differs from {keys['wte.weight']}, but "
                                f"{CONFIG_FILE} says tie_word_embeddings true")
    return state


def load_hf_folder(path, dtype: str = "float32", dropout: float | None = None) -> GPT:
    """A GPT with the LM head, in eval mode, holding the GPT-2 of a Hugging Face folder.

    Reads `config.json` (see config_from_hf; `dropout` is passed on) and `model.safetensors`,
    memory-mapped with safetensors' NumPy reader (no pickle). Keys may carry the
    `transformer.` prefix (save_pretrained of GPT2LMHeadModel) or not (the hub's gpt2 file);
    `lm_head.weight` may be absent when tied; `h.N.attn.bias` buffers are ignored. Float16,
    float32 and float64 tensors are converted to `dtype`.

    All or nothing: the whole file is checked before the model is built, so an error never
    leaves a half-loaded model. Every problem raises HFFolderError naming the file and the
    key or tensor. See docs/gpt2.md.
    """
    folder = os.fspath(path)
    if not os.path.exists(folder):
        raise HFFolderError(f"{folder} does not exist (expected a folder with {CONFIG_FILE} and {WEIGHTS_FILE})")
    if not os.path.isdir(folder):
        raise HFFolderError(f"{folder} is a file, not a folder (pass the folder that holds "
                            f"{CONFIG_FILE} and {WEIGHTS_FILE})")
    config_path = os.path.join(folder, CONFIG_FILE)
    config = config_from_hf(_read_config(folder), source=config_path, dtype=dtype, dropout=dropout)
    state = _read_weights(weights_path(folder), config)
    model = GPT(config, seed=0)
    model.load_state_dict(state, strict=True)  # every name and shape was checked above
    return model.eval()


def load_hf_checkpoint(path, dtype: str = "float32") -> Checkpoint:
    """The folder's GPT-2 as a checkpoint.Checkpoint (step 0, no optimizer state): what the
    runner starts every strategy from when `--model` replaces pretraining."""
    model = load_hf_folder(path, dtype=dtype)
    return Checkpoint(params=model.params, masks={}, optimizer_state=None, schedule_state=None, step=0,
                      rng_state=None, extra={"kind": "pretrained", "from": "hugging_face"},
                      config=model.config.to_dict(), meta={"head": "lm", "tied": model.config.tie_weights},
                      path=os.fspath(path))


# ---------------------------------------------------------------------- exporting


def hf_config(model: GPT) -> dict:
    """The config.json of GPT2LMHeadModel for `model` (its backbone and LM head).

    Every setting is written out, so transformers' defaults cannot change what it means.
    A classifier head is not part of GPT-2: its config is that of the tied LM model.
    """
    cfg = model.config
    tied = cfg.head != "lm" or cfg.tie_weights
    # GPT-2's <|endoftext|> id only means something with GPT-2's own vocabulary
    eot = 50256 if cfg.vocab_size == 50257 else None
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "initializer_range": cfg.init_std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": tied,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "dtype": cfg.dtype,
    }


def hf_state_dict(model: GPT) -> dict[str, np.ndarray]:
    """Our parameters under GPT2LMHeadModel's names: `transformer.` + backbone name, and
    `lm_head.weight` only for an untied LM head (a tied one is wte, which safetensors
    stores once). A classifier head has no GPT-2 name and is left out. No copies."""
    out = {}
    for name in hf_shapes(model.config):
        key = name if name == "lm_head.weight" else PREFIX + name
        out[key] = np.ascontiguousarray(model.params[name])
    return out


def _check_target(folder: str) -> None:
    """Refuse a file, or a non-empty folder that is not a GPT-2 folder: never clobber
    the user's other files. In a GPT-2 folder only config.json and model.safetensors are
    replaced; the tokenizer files beside them stay."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise HFFolderError(f"{folder} is a file, not a folder")
    if not os.path.isdir(folder) or not os.listdir(folder):
        return
    config_path = os.path.join(folder, CONFIG_FILE)
    try:
        with open(config_path, encoding="utf-8") as f:
            kind = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind != "gpt2":
        raise HFFolderError(f"{folder} is not empty and {config_path} does not describe a GPT-2 "
                            f"(model_type gpt2); refusing to write into it")
    if os.path.exists(os.path.join(folder, SHARD_INDEX)):
        raise HFFolderError(f"{os.path.join(folder, SHARD_INDEX)} exists: loaders could mix its shards "
                            f"with the new {WEIGHTS_FILE}; write to another folder")


def save_hf_folder(model: GPT, path) -> None:
    """Write `model` as a Hugging Face GPT-2 folder: config.json and model.safetensors.

    GPT2LMHeadModel.from_pretrained(path) then computes what `model` computes. A tied LM
    head is stored once (as wte); an untied one as lm_head.weight. A model with a
    classifier head exports its backbone with a tied LM head: the classifier is dropped,
    and a warning is logged saying so.

    The folder is created if needed. An existing non-empty folder must already be a GPT-2
    folder (config.json with model_type gpt2); then only those two files are replaced,
    each written to a temporary file in the folder and renamed (checkpoint.atomic_open),
    so a crash never leaves half a file. See docs/gpt2.md#exporting.
    """
    from safetensors.numpy import save as safetensors_bytes

    folder = os.fspath(path)
    _check_target(folder)
    dropped = [n for n in model.params if n not in hf_shapes(model.config)]
    if dropped:
        log.warning("save_hf_folder: the %s head (%s) has no GPT-2 equivalent and is not exported; "
                    "%s holds the backbone with a tied LM head", model.config.head,
                    ", ".join(dropped), folder)
    os.makedirs(folder, exist_ok=True)
    # the weights first: if we stop between the two files, a new folder has no config.json
    # yet, and loading it fails with a clear message rather than reading half an export
    blob = safetensors_bytes(hf_state_dict(model), metadata={"format": "pt"})
    with atomic_open(os.path.join(folder, WEIGHTS_FILE)) as f:
        f.write(blob)
    with atomic_open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump(hf_config(model), f, indent=2)
        f.write("\n")
