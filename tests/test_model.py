"""The whole model: gradient checks for every head, against GPT-2 as Hugging Face defines it,
and the errors bad input gets."""
import numpy as np
import pytest

from gradcheck import numerical_gradient, tensor_rel_error
from transferlab import GPT, GPTConfig
from transferlab.losses import IGNORE_INDEX

V, T, B = 11, 5, 2
PAD, CLS = 9, 10


def tiny(**overrides):
    base = dict(vocab_size=V, block_size=8, n_layer=2, n_head=2, n_embd=8, dtype="float64")
    base.update(overrides)
    return GPT(GPTConfig(**base), seed=3)


def batch(rng, head, n_classes=3, padded=False, cls=False, score=False):
    idx = rng.integers(0, PAD, (B, T))
    mask = np.ones((B, T), dtype=bool)
    if padded:
        idx[0, 3:] = PAD  # row 0 has 3 real tokens, row 1 is full
        mask[0, 3:] = False
    if cls:  # CLS right after the last real token (row 0), or in the last slot (row 1)
        idx[0, 3 if padded else 4] = CLS
        idx[1, 4] = CLS
        mask |= idx == CLS
    if head == "lm":
        targets = rng.integers(0, V, (B, T))
    elif head == "token":
        targets = rng.integers(0, n_classes, (B, T))
    elif score:
        targets = rng.random(B)
    else:
        targets = rng.integers(0, n_classes, B)
    return idx, targets, mask


def check_model_grads(model, idx, targets, mask=None, entries=6, dropout_seed=None):
    """Finite differences on `entries` random entries of every parameter tensor."""
    rng = np.random.default_rng(0)

    def loss():
        if dropout_seed is not None:  # the same dropout masks on every forward
            model.rng = np.random.default_rng(dropout_seed)
        return model(idx, targets, attention_mask=mask)[1]

    loss()
    grads = model.backward()
    assert set(grads) == set(model.params)
    worst = {}
    for name, p in model.params.items():
        assert grads[name].shape == p.shape and grads[name].dtype == p.dtype, name
        flat = rng.choice(p.size, size=min(entries, p.size), replace=False)
        where = [np.unravel_index(i, p.shape) for i in flat]
        num = numerical_gradient(loss, p, indices=where)
        ana = np.zeros_like(num)
        for w in where:
            ana[w] = grads[name][w]
        worst[name] = tensor_rel_error(ana, num)
    bad = {n: e for n, e in worst.items() if e > 1e-5}
    assert not bad, bad
    return grads


@pytest.mark.parametrize("causal", [True, False])
def test_lm_gradients_every_tensor(causal):
    rng = np.random.default_rng(1)
    model = tiny(causal=causal)
    idx, targets, _ = batch(rng, "lm")
    check_model_grads(model, idx, targets, entries=12)


def test_lm_gradients_all_entries_of_every_tensor():
    """One full check: every single entry of every parameter, tied embedding included."""
    rng = np.random.default_rng(2)
    model = tiny(n_layer=1, n_embd=4, n_head=2)
    idx, targets, _ = batch(rng, "lm")
    targets[1, 2] = IGNORE_INDEX
    check_model_grads(model, idx, targets, entries=10**9)


def test_untied_lm_head_gradients():
    rng = np.random.default_rng(3)
    model = tiny(tie_weights=False)
    idx, targets, _ = batch(rng, "lm")
    grads = check_model_grads(model, idx, targets)
    assert "lm_head.weight" in grads


@pytest.mark.parametrize("causal", [None, True])
@pytest.mark.parametrize("hidden", [0, 6])
def test_token_head_gradients_with_padding(causal, hidden):
    rng = np.random.default_rng(4)
    model = tiny(head="token", n_classes=3, pad_id=PAD, causal=causal, head_hidden=hidden)
    idx, targets, mask = batch(rng, "token", padded=True)
    check_model_grads(model, idx, targets, mask)


@pytest.mark.parametrize("pooling", ["last", "mean", "attention", "cls"])
@pytest.mark.parametrize("causal", [None, True])
def test_sequence_classifier_gradients(pooling, causal):
    rng = np.random.default_rng(5)
    model = tiny(head="sequence", pooling=pooling, n_classes=3, pad_id=PAD, cls_id=CLS, causal=causal)
    idx, targets, mask = batch(rng, "sequence", padded=True, cls=pooling == "cls")
    check_model_grads(model, idx, targets, mask)


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_sequence_scorer_gradients(pooling):
    rng = np.random.default_rng(6)
    model = tiny(head="sequence", pooling=pooling, sequence_output="score", pad_id=PAD)
    idx, targets, mask = batch(rng, "sequence", padded=True, score=True)
    check_model_grads(model, idx, targets, mask)
    scores, _ = model(idx, targets, attention_mask=mask)
    assert scores.shape == (B,) and np.all((scores > 0) & (scores < 1))


def test_binary_classifier_is_two_way_sequence_head():
    rng = np.random.default_rng(7)
    model = tiny(head="sequence", pooling="mean", n_classes=2, head_hidden=5)
    idx, targets, _ = batch(rng, "sequence", n_classes=2)
    check_model_grads(model, idx, targets)
    logits, _ = model(idx)
    assert logits.shape == (B, 2)


@pytest.mark.parametrize("head", ["lm", "token"])
def test_gradients_with_dropout_at_fixed_mask(head):
    rng = np.random.default_rng(8)
    model = tiny(head=head, n_classes=3, dropout=0.2)
    idx, targets, _ = batch(rng, head)
    check_model_grads(model, idx, targets, dropout_seed=11)


def test_dropout_train_and_eval_modes():
    rng = np.random.default_rng(9)
    model = tiny(dropout=0.5)
    idx, _, _ = batch(rng, "lm")
    model.eval()
    a, _ = model(idx)
    b, _ = model(idx)
    np.testing.assert_array_equal(a, b)  # eval: deterministic
    model.train()
    c, _ = model(idx)
    assert np.abs(c - a).max() > 1e-3  # train: units are dropped


def test_padding_is_invisible_to_real_tokens():
    """With a padding mask, what stands in the padded slots cannot change real outputs."""
    rng = np.random.default_rng(10)
    model = tiny(head="token", n_classes=3).eval()
    idx, _, mask = batch(rng, "token", padded=True)
    other = idx.copy()
    other[0, 3:] = [1, 2]
    a, _ = model(idx, attention_mask=mask)
    b, _ = model(other, attention_mask=mask)
    np.testing.assert_allclose(a[mask], b[mask], atol=1e-12)


def test_fully_padded_row_gives_no_nan():
    model = tiny(head="sequence", pooling="attention", n_classes=3, pad_id=PAD)
    idx = np.full((B, T), PAD)
    idx[1, :2] = [1, 2]
    logits, loss = model(idx, np.array([0, 1]))
    grads = model.backward()
    assert np.isfinite(logits).all() and np.isfinite(loss)
    assert all(np.isfinite(g).all() for g in grads.values())


def test_causal_lm_does_not_see_the_future():
    rng = np.random.default_rng(12)
    model = tiny().eval()
    idx = rng.integers(0, V, (1, T))
    later = idx.copy()
    later[0, 3:] = (later[0, 3:] + 1) % V
    a, _ = model(idx)
    b, _ = model(later)
    np.testing.assert_allclose(a[0, :3], b[0, :3], atol=1e-12)
    assert np.abs(a[0, 3:] - b[0, 3:]).max() > 1e-6


def test_float32_stays_float32():
    rng = np.random.default_rng(13)
    for head in ("lm", "token", "sequence"):
        model = tiny(head=head, n_classes=3, dtype="float32", dropout=0.1, pooling="attention")
        idx, targets, _ = batch(rng, head)
        logits, loss = model(idx, targets)
        grads = model.backward()
        assert logits.dtype == np.float32
        assert all(g.dtype == np.float32 for g in grads.values()), head


def test_params_use_hugging_face_names_and_layout():
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32))
    p = model.params
    assert p["wte.weight"].shape == (50, 32)
    assert p["wpe.weight"].shape == (16, 32)
    assert p["h.1.attn.c_attn.weight"].shape == (32, 96)
    assert p["h.1.attn.c_proj.weight"].shape == (32, 32)
    assert p["h.0.mlp.c_fc.weight"].shape == (32, 128)
    assert p["h.0.mlp.c_proj.weight"].shape == (128, 32)
    assert p["ln_f.bias"].shape == (32,)
    assert len(p) == 2 + 2 * 12 + 2  # tied LM head: no separate lm_head.weight
    n = sum(a.size for a in p.values())
    # GPT-2 parameter count formula: V C + T C + L (12 C^2 + 13 C) + 2 C
    assert n == 50 * 32 + 16 * 32 + 2 * (12 * 32 * 32 + 13 * 32) + 2 * 32


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "idx, message",
    [
        (np.array([[1, 2, 11]]), "token id 11 at position (0, 2) is outside the vocabulary [0, 11)"),
        (np.array([[1, -1]]), "token id -1 at position (0, 1) is outside the vocabulary [0, 11)"),
        (np.zeros((1, 9), dtype=int), "sequence length 9 exceeds block_size 8"),
        (np.zeros((2, 3)), "idx must be a 2-D integer array (B, T), got shape (2, 3) dtype float64"),
        (np.zeros(3, dtype=int), "idx must be a 2-D integer array (B, T), got shape (3,)"),
    ],
)
def test_bad_token_input(idx, message):
    with pytest.raises(ValueError) as err:
        tiny()(idx)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_embd=10, n_head=4), "GPTConfig.n_embd must be a multiple of GPTConfig.n_head (4), got 10"),
        (dict(head="regression"), "head must be one of ('lm', 'token', 'sequence'), got 'regression'"),
        (dict(head="sequence", pooling="max"), "GPTConfig.pooling must be one of cls, last, mean, attention, got 'max'"),
        (dict(dtype="float16"), "GPTConfig.dtype must be one of float32, float64, got 'float16'"),
        (dict(n_layer=0), "GPTConfig.n_layer must be >= 1, got 0"),
        (dict(n_layer=2.0), "GPTConfig.n_layer must be an integer, got float 2.0"),
        (dict(dropout=1.0), "GPTConfig.dropout must be in [0, 1), got 1.0"),
        (dict(vocab_size=0), "GPTConfig.vocab_size must be >= 1, got 0"),
        (dict(head="sequence", pooling="cls"), "cls_id must be set for pooling='cls'"),
        (dict(pad_id=11), "pad_id (11) must be a token id in [0, 11)"),
    ],
)
def test_bad_config(kwargs, message):
    base = dict(vocab_size=V, block_size=8, n_layer=1, n_head=2, n_embd=8)
    base.update(kwargs)
    with pytest.raises(ValueError) as err:
        GPTConfig(**base)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "head, targets, message",
    [
        ("lm", np.zeros((2, 4), dtype=int), "targets for the lm head must have shape (2, 5), got (2, 4)"),
        ("sequence", np.zeros((2, 5), dtype=int), "targets for the sequence head must have shape (2,), got (2, 5)"),
        ("token", np.full((2, 5), 3), "target 3 is outside [0, 3)"),
        ("sequence", np.array([0.5, 1.0]), "class targets must be integers"),
    ],
)
def test_bad_targets(head, targets, message):
    model = tiny(head=head, n_classes=3)
    with pytest.raises(ValueError) as err:
        model(np.zeros((2, 5), dtype=int), targets)
    assert message in str(err.value)


def test_cls_pooling_without_cls_token_names_the_row():
    model = tiny(head="sequence", pooling="cls", cls_id=CLS)
    idx = np.zeros((2, 5), dtype=int)
    idx[0, 4] = CLS
    with pytest.raises(ValueError, match="row 1 has no CLS token"):
        model(idx)


def test_backward_before_forward_is_a_clear_error():
    with pytest.raises(RuntimeError, match="needs a forward pass with targets"):
        tiny().backward()


# ---------------------------------------------------------------------- loading weights


def test_load_state_dict_strips_prefixes_and_ignores_buffers():
    src = tiny(n_layer=1)
    dst = tiny(n_layer=1)
    dst.params["wte.weight"][...] = 0.0
    state = {f"transformer.{k}": v for k, v in src.params.items()}
    state["_orig_mod.module.transformer.wpe.weight"] = state.pop("transformer.wpe.weight")
    state["transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 8, 8)))  # GPT-2 mask buffer
    state["transformer.h.0.attn.masked_bias"] = np.array(-1e4)
    state["lm_head.weight"] = src.params["wte.weight"]  # tied duplicate
    report = dst.load_state_dict(state)
    assert report.ok, str(report)
    assert sorted(report.loaded) == sorted(src.params)
    assert {k for k, _ in report.ignored} == {
        "transformer.h.0.attn.bias", "transformer.h.0.attn.masked_bias", "lm_head.weight"}
    for name in src.params:
        np.testing.assert_array_equal(dst.params[name], src.params[name])


def test_load_report_lists_missing_unexpected_and_mismatched():
    model = tiny(n_layer=1)
    state = {k: v for k, v in tiny(n_layer=1).params.items() if k != "ln_f.bias"}
    state["wpe.weight"] = np.zeros((4, 8))
    state["h.7.mlp.c_fc.weight"] = np.zeros((8, 32))
    held = model.params["wpe.weight"].copy()
    report = model.load_state_dict(state)
    assert report.missing == ["wpe.weight", "ln_f.bias"]
    assert report.unexpected == ["h.7.mlp.c_fc.weight"]
    assert report.mismatched == [("wpe.weight", (8, 8), (4, 8))]
    np.testing.assert_array_equal(model.params["wpe.weight"], held)  # skipped, not damaged
    assert "wpe.weight expects (8, 8), checkpoint has (4, 8)" in str(report)
    with pytest.raises(ValueError, match="strict=True"):
        model.load_state_dict(state, strict=True)


def test_lm_head_weight_alone_loads_into_wte():
    src, dst = tiny(n_layer=1), tiny(n_layer=1)
    state = dict(src.params)
    state["lm_head.weight"] = state.pop("wte.weight")
    report = dst.load_state_dict(state)
    assert report.ok
    np.testing.assert_array_equal(dst.params["wte.weight"], src.params["wte.weight"])


# ---------------------------------------------------------------------- GPT-2 reference


def hf_gpt2(n_layer=2, n_head=4, n_embd=32, vocab=50, n_pos=16):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=vocab, n_positions=n_pos, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(cfg).double()
    # randomise LayerNorms and biases too, so every parameter is exercised
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return torch, hf


@pytest.mark.slow
def test_matches_hugging_face_gpt2_logits_loss_and_every_gradient():
    """Our model loaded from a GPT2LMHeadModel state dict computes what GPT-2 computes."""
    torch, hf = hf_gpt2()
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 50, (3, 16))
    hf_logits = hf(torch.tensor(idx)).logits  # (3, 16, 50) float64
    # the loss in float64 (HF's own loss helper upcasts to float32), next-token targets
    hf_loss = torch.nn.functional.cross_entropy(
        hf_logits[:, :-1].reshape(-1, 50), torch.tensor(idx[:, 1:]).reshape(-1))
    hf_loss.backward()

    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32, dtype="float64"))
    report = model.load_state_dict(hf.state_dict())
    assert report.ok and not report.missing, str(report)
    # the same 16 tokens; the last position has no next token, so its target is ignored
    targets = np.full_like(idx, IGNORE_INDEX)
    targets[:, :-1] = idx[:, 1:]
    logits, loss = model(idx, targets)
    grads = model.backward()
    np.testing.assert_allclose(logits, hf_logits.detach().numpy(), rtol=0, atol=1e-12)
    assert abs(loss - hf_loss.item()) < 1e-12
    for name, param in hf.transformer.named_parameters():
        np.testing.assert_allclose(grads[name], param.grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=name)


@pytest.mark.slow
def test_gpt2_small_state_dict_loads_with_no_missing_key():
    """GPT-2 small's real shapes (124M parameters), as Hugging Face writes its state dict."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    hf_cfg = transformers.GPT2Config()  # GPT-2 small: V 50257, 1024 positions, 12 x 768
    with torch.device("meta"):  # shapes only: no memory, no random init
        hf = transformers.GPT2LMHeadModel(hf_cfg)
    state = {k: np.zeros(tuple(v.shape), dtype=np.float32) for k, v in hf.state_dict().items()}
    model = GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768), seed=0)
    report = model.load_state_dict(state)
    assert report.ok and not report.missing, str(report)
    assert sum(p.size for p in model.params.values()) == 124_439_808
