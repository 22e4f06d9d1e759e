"""Hugging Face GPT-2 folders: load them into our GPT and export ours back (src/transferlab/hf.py).

Checked against transformers' GPT2LMHeadModel (skipped without torch/transformers), and
without torch: the export -> load round trip, hub-style files, and every bad input.
"""
import json
import logging
import os
import re
import struct

import numpy as np
import pytest

safetensors_numpy = pytest.importorskip("safetensors.numpy")

from transferlab import GPT, GPTConfig  # noqa: E402
from transferlab.hf import (  # noqa: E402
    HFFolderError,
    config_from_hf,
    hf_shapes,
    load_hf_folder,
    save_hf_folder,
)

V, T, C, L, NH = 50, 16, 32, 2, 4
SMALL = dict(vocab_size=V, block_size=T, n_layer=L, n_head=NH, n_embd=C)

# GPT-2 small's config.json as published with OpenAI's gpt2 weights (values written out)
GPT2_SMALL_CONFIG = {
    "activation_function": "gelu_new",
    "architectures": ["GPT2LMHeadModel"],
    "attn_pdrop": 0.1,
    "bos_token_id": 50256,
    "embd_pdrop": 0.1,
    "eos_token_id": 50256,
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05,
    "model_type": "gpt2",
    "n_ctx": 1024,
    "n_embd": 768,
    "n_head": 12,
    "n_layer": 12,
    "n_positions": 1024,
    "resid_pdrop": 0.1,
    "summary_activation": None,
    "summary_first_dropout": 0.1,
    "summary_proj_to_labels": True,
    "summary_type": "cls_index",
    "summary_use_proj": True,
    "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
    "vocab_size": 50257,
}


def ours(seed=1, **overrides):
    cfg = dict(SMALL)
    cfg.update(overrides)
    return GPT(GPTConfig(**cfg), seed=seed).eval()


def tokens(n=3):
    return np.random.default_rng(0).integers(0, V, (n, T))


def hf_model(**overrides):
    """A small random GPT2LMHeadModel; LayerNorms and biases randomised too."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    kwargs = dict(n_embd=C, n_layer=L, n_head=NH, n_positions=T, vocab_size=V,
                  bos_token_id=0, eos_token_id=0)
    kwargs.update(overrides)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kwargs)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return torch, transformers, hf


def hf_logits(torch, hf, idx):
    with torch.no_grad():
        return hf(torch.tensor(idx)).logits.numpy()


def read_tensors(path):
    from safetensors import safe_open

    with safe_open(path, framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def write_config(folder, config):
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)


# ---------------------------------------------------------------------- against transformers


def test_load_hf_folder_matches_hugging_face_float32(tmp_path):
    torch, _, hf = hf_model()
    hf.save_pretrained(tmp_path)  # safetensors, `transformer.` prefix, lm_head dropped (tied)
    model = load_hf_folder(tmp_path)
    assert not model.training and model.config.head == "lm" and model.config.tie_weights
    assert model.params["wte.weight"].dtype == np.float32
    assert (model.config.block_size, model.config.dropout) == (T, 0.1)
    idx = tokens()
    logits, _ = model(idx)
    assert np.abs(logits - hf_logits(torch, hf, idx)).max() < 1e-4


def test_load_hf_folder_matches_hugging_face_float64(tmp_path):
    torch, _, hf = hf_model()
    hf.save_pretrained(tmp_path)
    model = load_hf_folder(tmp_path, dtype="float64")
    idx = tokens()
    logits, _ = model(idx)
    assert logits.dtype == np.float64
    assert np.abs(logits - hf_logits(torch, hf.double(), idx)).max() < 1e-10


def test_gelu_pytorch_tanh_is_the_same_function(tmp_path):
    torch, _, hf = hf_model(activation_function="gelu_pytorch_tanh")
    hf.save_pretrained(tmp_path)
    model = load_hf_folder(tmp_path, dtype="float64")
    idx = tokens()
    assert np.abs(model(idx)[0] - hf_logits(torch, hf.double(), idx)).max() < 1e-10


def test_untied_hugging_face_model_loads_its_own_lm_head(tmp_path):
    torch, _, hf = hf_model(tie_word_embeddings=False)
    with torch.no_grad():
        hf.lm_head.weight.add_(0.5)  # make sure it differs from wte
    hf.save_pretrained(tmp_path)
    assert "lm_head.weight" in read_tensors(tmp_path / "model.safetensors")
    model = load_hf_folder(tmp_path, dtype="float64")
    assert not model.config.tie_weights
    np.testing.assert_array_equal(model.params["lm_head.weight"], hf.lm_head.weight.detach().double().numpy())
    idx = tokens()
    assert np.abs(model(idx)[0] - hf_logits(torch, hf.double(), idx)).max() < 1e-10


@pytest.mark.parametrize("tie", [True, False])
def test_exported_folder_loads_in_hugging_face(tmp_path, tie):
    torch, transformers, _ = hf_model()
    model = ours(tie_weights=tie)
    for name, p in model.params.items():  # LayerNorms and biases away from 1 and 0
        if "ln" in name or name.endswith("bias"):
            p += 0.1 * np.random.default_rng(len(name)).standard_normal(p.shape).astype(p.dtype)
    if not tie:
        model.params["lm_head.weight"] += 0.5
    save_hf_folder(model, tmp_path / "export")
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf.config.tie_word_embeddings is tie
    assert (hf.lm_head.weight is hf.transformer.wte.weight) is tie
    idx = tokens()
    assert np.abs(model(idx)[0] - hf_logits(torch, hf.eval(), idx)).max() < 1e-5


def test_gpt2_small_config_and_key_set(tmp_path):
    """The published gpt2 config maps onto GPTConfig, and GPT-2 small's real tensors (HF on
    the meta device: shapes only, nothing written) are exactly the ones we read."""
    cfg = config_from_hf(GPT2_SMALL_CONFIG)
    assert (cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd) == (50257, 1024, 12, 12, 768)
    assert (cfg.dropout, cfg.dtype, cfg.head, cfg.tie_weights) == (0.1, "float32", "lm", True)
    shapes = hf_shapes(cfg)
    assert sum(int(np.prod(s)) for s in shapes.values()) == 124_439_808

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_SMALL_CONFIG))
    buffer = re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$")  # the causal mask
    theirs = {k[len("transformer."):]: tuple(v.shape) for k, v in hf.state_dict().items()
              if k.startswith("transformer.") and not buffer.match(k)}
    assert theirs == shapes
    assert tuple(hf.state_dict()["lm_head.weight"].shape) == shapes["wte.weight"]


# ---------------------------------------------------------------------- without torch


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("tie", [True, False])
def test_export_then_load_is_exact(tmp_path, dtype, tie):
    model = ours(dtype=dtype, tie_weights=tie, dropout=0.05)
    save_hf_folder(model, tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]
    back = load_hf_folder(tmp_path / "m", dtype=dtype)
    assert back.config == model.config
    assert back.params.keys() == model.params.keys()
    for name, p in model.params.items():
        assert back.params[name].dtype == p.dtype
        np.testing.assert_array_equal(back.params[name], p, err_msg=name)
    idx = tokens()
    np.testing.assert_array_equal(back(idx)[0], model(idx)[0])


def test_export_writes_the_gpt2_config_and_names(tmp_path):
    save_hf_folder(ours(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert (config["n_positions"], config["n_ctx"], config["vocab_size"]) == (T, T, V)
    assert (config["activation_function"], config["layer_norm_epsilon"]) == ("gelu_new", 1e-5)
    assert config["tie_word_embeddings"] is True
    tensors = read_tensors(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in tensors  # tied: stored once, as wte
    assert all(k.startswith("transformer.") for k in tensors)
    assert tensors["transformer.h.0.mlp.c_fc.weight"].shape == (C, 4 * C)  # [in, out], no transpose


def test_hub_style_keys_buffers_and_a_tied_lm_head_copy(tmp_path):
    """The hub's gpt2 file: no `transformer.` prefix, attention buffers, maybe lm_head."""
    model = ours()
    tensors = {name: p for name, p in model.params.items()}
    for i in range(L):
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((T, T), dtype=np.float32))[None, None]
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, dtype=np.float32)
    tensors["lm_head.weight"] = model.params["wte.weight"]  # tied: the same values
    safetensors_numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
    write_config(tmp_path, dict(GPT2_SMALL_CONFIG, n_embd=C, n_layer=L, n_head=NH,
                                n_positions=T, n_ctx=T, vocab_size=V))
    back = load_hf_folder(tmp_path)
    for name, p in model.params.items():
        np.testing.assert_array_equal(back.params[name], p, err_msg=name)


def test_float16_tensors_are_converted(tmp_path):
    model = ours()
    tensors = {"transformer." + k: v.astype(np.float16) for k, v in model.params.items()}
    safetensors_numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
    save_config = dict(GPT2_SMALL_CONFIG, n_embd=C, n_layer=L, n_head=NH, n_positions=T, vocab_size=V)
    write_config(tmp_path, save_config)
    back = load_hf_folder(tmp_path)
    assert back.params["wte.weight"].dtype == np.float32
    np.testing.assert_array_equal(back.params["wte.weight"], model.params["wte.weight"].astype(np.float16))


def test_classifier_exports_its_backbone_with_a_tied_lm_head(tmp_path, caplog):
    model = ours(head="sequence", n_classes=3, pooling="mean")
    with caplog.at_level(logging.WARNING, logger="transferlab.hf"):
        save_hf_folder(model, tmp_path)
    assert "the sequence head (seq_head." in caplog.text and "tied LM head" in caplog.text
    back = load_hf_folder(tmp_path)
    assert back.config.head == "lm" and back.config.tie_weights
    assert set(back.params) == {n for n in model.params if not n.startswith("seq_head.")}
    for name, p in back.params.items():
        np.testing.assert_array_equal(p, model.params[name], err_msg=name)


def test_dropout_rule(tmp_path):
    base = dict(GPT2_SMALL_CONFIG, resid_pdrop=0.05, embd_pdrop=0.05, attn_pdrop=0.05)
    assert config_from_hf(base).dropout == 0.05
    differ = dict(base, attn_pdrop=0.0)
    with pytest.raises(HFFolderError, match=r"resid_pdrop=0.05, embd_pdrop=0.05, attn_pdrop=0.0 differ"):
        config_from_hf(differ)
    assert config_from_hf(differ, dropout=0.0).dropout == 0.0  # the caller chooses
    del base["resid_pdrop"]  # left out: GPT2Config's default 0.1, which now differs
    with pytest.raises(HFFolderError, match="resid_pdrop=0.1"):
        config_from_hf(base)


def test_export_into_a_gpt2_folder_keeps_the_tokenizer_files(tmp_path):
    save_hf_folder(ours(seed=1), tmp_path)
    (tmp_path / "vocab.json").write_text("{}", encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    newer = ours(seed=2)
    save_hf_folder(newer, tmp_path)  # a GPT-2 folder: only its two files are replaced
    assert sorted(os.listdir(tmp_path)) == ["config.json", "merges.txt", "model.safetensors", "vocab.json"]
    np.testing.assert_array_equal(load_hf_folder(tmp_path).params["wte.weight"], newer.params["wte.weight"])


def test_export_refuses_a_folder_of_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(HFFolderError) as err:
        save_hf_folder(ours(), tmp_path)
    assert f"{tmp_path} is not empty" in str(err.value) and "refusing to write" in str(err.value)
    assert os.listdir(tmp_path) == ["notes.txt"]
    (tmp_path / "file").write_text("x", encoding="utf-8")
    with pytest.raises(HFFolderError, match="is a file, not a folder"):
        save_hf_folder(ours(), tmp_path / "file")


def test_a_crash_while_exporting_leaves_the_old_files_whole(tmp_path, monkeypatch):
    save_hf_folder(ours(seed=1), tmp_path)
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}

    def crash(obj, f, **kwargs):
        f.write('{"model_type": "gp')  # half a file, then the crash
        raise KeyboardInterrupt

    import transferlab.hf as hf

    monkeypatch.setattr(hf.json, "dump", crash)
    with pytest.raises(KeyboardInterrupt):
        save_hf_folder(ours(seed=1), tmp_path)  # same weights, so only config.json would change
    assert sorted(os.listdir(tmp_path)) == sorted(before)  # no temporary file left behind
    assert {n: (tmp_path / n).read_bytes() for n in before} == before


# ---------------------------------------------------------------------- bad input


def good_folder(path, tie=True):
    save_hf_folder(ours(tie_weights=tie), path)
    return path


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is ...:
            del config[key]
        else:
            config[key] = value
    write_config(folder, config)


def edit_tensors(folder, change):
    tensors = read_tensors(folder / "model.safetensors")
    change(tensors)
    safetensors_numpy.save_file(tensors, str(folder / "model.safetensors"))


def raw_safetensors(path, entries):
    """A safetensors file written by hand (for a dtype NumPy lacks): name -> (dtype, shape, bytes)."""
    header, data = {}, b""
    for name, (dtype, shape, blob) in entries.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def bf16_file(folder):
    tensors = read_tensors(folder / "model.safetensors")
    entries = {k: ("F32", v.shape, v.tobytes()) for k, v in tensors.items()}
    w = tensors["transformer.ln_f.weight"]
    entries["transformer.ln_f.weight"] = ("BF16", w.shape, b"\x00" * (2 * w.size))
    raw_safetensors(folder / "model.safetensors", entries)


def set_entry(name, value):
    def change(tensors):
        tensors[name] = tensors[name].copy()
        tensors[name].flat[3] = value
    return change


CONFIG_CASES = [
    (dict(activation_function="gelu"), "activation_function 'gelu' is not implemented"),
    (dict(activation_function="relu"), "activation_function 'relu' is not implemented"),
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx is true"),
    (dict(reorder_and_upcast_attn=True), "reorder_and_upcast_attn is true"),
    (dict(scale_attn_weights=False), "scale_attn_weights is false"),
    (dict(add_cross_attention=True), "add_cross_attention is true"),
    (dict(layer_norm_epsilon=1e-6), "layer_norm_epsilon 1e-06 is not implemented"),
    (dict(n_inner=100), "n_inner 100 is not implemented; transferlab's MLP is 4 * n_embd = 128"),
    (dict(model_type="gpt_neo"), "model_type is 'gpt_neo'; only 'gpt2' can be loaded"),
    (dict(n_embd=...), "required key 'n_embd' is missing"),
    (dict(n_positions=...), "required key 'n_positions' is missing"),
    (dict(n_layer="2"), "n_layer must be a positive integer, got '2'"),
    (dict(n_head=5), "GPTConfig.n_embd must be a multiple of GPTConfig.n_head (5), got 32"),
    (dict(attn_pdrop=0.1), "resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.1 differ"),
    (dict(tie_word_embeddings="yes"), "tie_word_embeddings must be true or false"),
]


@pytest.mark.parametrize("changes, message", CONFIG_CASES, ids=[m[:30] for _, m in CONFIG_CASES])
def test_unsupported_config_is_refused_by_name(tmp_path, changes, message):
    folder = good_folder(tmp_path)
    edit_config(folder, **changes)
    with pytest.raises(HFFolderError) as err:
        load_hf_folder(folder)
    text = str(err.value)
    assert text.startswith(f"{folder / 'config.json'}: ") and message in text, text
    assert "\n" not in text


def test_n_inner_of_four_times_n_embd_is_accepted(tmp_path):
    folder = good_folder(tmp_path)
    edit_config(folder, n_inner=4 * C)
    assert load_hf_folder(folder).config.n_embd == C


FILE_CASES = {
    "path missing": (lambda f: f / "nope", lambda f: None, "nope does not exist"),
    "path is a file": (lambda f: f / "config.json", lambda f: None,
                       "config.json is a file, not a folder"),
    "config missing": (lambda f: f, lambda f: os.remove(f / "config.json"), "config.json is missing"),
    "config not utf-8": (lambda f: f, lambda f: (f / "config.json").write_bytes(b'{"n_embd": "\xff"}'),
                         "config.json is not UTF-8 text (byte 12)"),
    "config not json": (lambda f: f, lambda f: (f / "config.json").write_text("{'n_embd': 32}"),
                        "config.json is not valid JSON (line 1, column 2"),
    "config not an object": (lambda f: f, lambda f: (f / "config.json").write_text("[1, 2]"),
                             "config.json: expected a JSON object, got list"),
    "weights missing": (lambda f: f, lambda f: os.remove(f / "model.safetensors"),
                        "model.safetensors is missing"),
    "only pytorch_model.bin": (
        lambda f: f,
        lambda f: os.replace(f / "model.safetensors", f / "pytorch_model.bin"),
        "pytorch_model.bin is a pickle file, which transferlab never loads"),
    "sharded": (lambda f: f,
                lambda f: os.replace(f / "model.safetensors", f / "model.safetensors.index.json"),
                "model.safetensors.index.json names a sharded checkpoint"),
    "truncated": (lambda f: f,
                  lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:-100]),
                  "model.safetensors is truncated or corrupt (SafetensorError"),
    "empty": (lambda f: f, lambda f: (f / "model.safetensors").write_bytes(b""),
              "model.safetensors is truncated or corrupt"),
    "wrong shape": (
        lambda f: f,
        lambda f: edit_tensors(f, lambda t: t.__setitem__("transformer.h.1.mlp.c_fc.weight",
                                                          np.zeros((C, 100), np.float32))),
        "tensor transformer.h.1.mlp.c_fc.weight has shape (32, 100), expected (32, 128) from config.json"),
    "transposed": (
        lambda f: f,
        lambda f: edit_tensors(f, lambda t: t.__setitem__("transformer.h.0.attn.c_attn.weight",
                                                          t["transformer.h.0.attn.c_attn.weight"].T.copy())),
        "tensor transformer.h.0.attn.c_attn.weight has shape (96, 32), expected (32, 96)"),
    "missing tensor": (lambda f: f, lambda f: edit_tensors(f, lambda t: t.pop("transformer.ln_f.bias")),
                       "tensor transformer.ln_f.bias missing"),
    "nan": (lambda f: f, lambda f: edit_tensors(f, set_entry("transformer.h.0.ln_2.bias", np.nan)),
            "tensor transformer.h.0.ln_2.bias holds NaN or infinite values"),
    "inf": (lambda f: f, lambda f: edit_tensors(f, set_entry("transformer.wpe.weight", -np.inf)),
            "tensor transformer.wpe.weight holds NaN or infinite values"),
    "integer dtype": (
        lambda f: f,
        lambda f: edit_tensors(f, lambda t: t.__setitem__("transformer.ln_f.weight", np.ones(C, np.int64))),
        "tensor transformer.ln_f.weight has dtype I64"),
    "bfloat16": (lambda f: f, bf16_file, "tensor transformer.ln_f.weight has dtype BF16"),
    "unexpected tensor": (
        lambda f: f,
        lambda f: edit_tensors(f, lambda t: t.__setitem__("score.weight", np.zeros((2, C), np.float32))),
        "unexpected tensor score.weight"),
    "both key styles": (
        lambda f: f,
        lambda f: edit_tensors(f, lambda t: t.__setitem__("wpe.weight", t["transformer.wpe.weight"])),
        "tensors transformer.wpe.weight and wpe.weight are both wpe.weight"),
    "tied head differs": (
        lambda f: f,
        lambda f: edit_tensors(f, lambda t: t.__setitem__("lm_head.weight", t["transformer.wte.weight"] + 1)),
        "tensor lm_head.weight differs from transformer.wte.weight, but config.json says "
        "tie_word_embeddings true"),
    "untied head missing": (
        lambda f: f,
        lambda f: (good_folder(f, tie=False), edit_tensors(f, lambda t: t.pop("lm_head.weight"))),
        "tensor lm_head.weight missing"),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_bad_folder_raises_one_line_naming_the_file(tmp_path, case):
    where, damage, message = FILE_CASES[case]
    folder = good_folder(tmp_path / "gpt2")
    damage(folder)
    with pytest.raises(HFFolderError) as err:
        load_hf_folder(where(folder))
    text = str(err.value)
    assert message in text and "\n" not in text, text
    assert str(folder) in text, text  # the folder or the file inside it is named


def test_pytorch_bin_message_says_how_to_convert(tmp_path):
    folder = good_folder(tmp_path)
    os.replace(folder / "model.safetensors", folder / "pytorch_model.bin")
    with pytest.raises(HFFolderError) as err:
        load_hf_folder(folder)
    text = str(err.value)
    assert f"from_pretrained('{folder}').save_pretrained('{folder}', safe_serialization=True)" in text


@pytest.mark.parametrize("tie", [True, False])
def test_hf_shapes_are_our_parameter_shapes(tie):
    """The loader checks a file against hf_shapes before building a GPT: they must agree."""
    model = ours(tie_weights=tie)
    assert hf_shapes(model.config) == {n: p.shape for n, p in model.params.items()}
