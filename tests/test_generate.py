"""Generation with a KV cache: the cached step against recomputing the prefix, greedy decoding
against Hugging Face's generate, top-k / top-p against brute-force enumeration, seeds, the
stop token, and the errors bad input gets."""
import itertools

import numpy as np
import pytest

from transferlab import GPT, GPTConfig
from transferlab.generate import (
    KVCache,
    decode_step,
    generate,
    prefill,
    sample_next,
    sampling_probs,
    transition_counts,
    transition_tv,
)
from transferlab.tasks import MarkovMixture

V = 13


def tiny(dtype="float64", **overrides):
    """A small LM whose LayerNorms, biases and (untied) head are random too, so a wrong
    parameter anywhere changes the logits."""
    # init_std 0.3, not 0.02: large enough weights that the next token depends on the context
    base = dict(vocab_size=V, block_size=24, n_layer=2, n_head=2, n_embd=8, dtype=dtype, init_std=0.3)
    base.update(overrides)
    model = GPT(GPTConfig(**base), seed=3)
    rng = np.random.default_rng(99)
    for name, p in model.params.items():
        if ".ln_" in name or name.startswith("ln_f") or name.endswith("bias") or name == "lm_head.weight":
            p += (0.3 * rng.standard_normal(p.shape)).astype(p.dtype)
    return model.eval()


# ---------------------------------------------------------------------- the cached path


@pytest.mark.parametrize("tie", [True, False])
def test_every_cached_step_equals_recomputing_the_prefix(tie):
    model = tiny(tie_weights=tie)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, V, (2, 4))
    cache = KVCache(model, batch_size=2)
    logits = prefill(model, idx, cache)
    np.testing.assert_allclose(logits, model(idx)[0][:, -1], rtol=0, atol=1e-10)
    for _ in range(model.config.block_size - idx.shape[1]):
        token = sample_next(logits, rng)
        idx = np.concatenate([idx, token[:, None]], axis=1)
        logits = decode_step(model, token, cache)
        assert logits.shape == (2, V) and cache.length == idx.shape[1]
        np.testing.assert_allclose(logits, model(idx)[0][:, -1], rtol=0, atol=1e-10)


def test_prompt_fed_in_chunks_gives_the_same_logits():
    model = tiny()
    idx = np.random.default_rng(1).integers(0, V, (2, 9))
    cache = KVCache(model, 2)
    prefill(model, idx[:, :4], cache)
    logits = prefill(model, idx[:, 4:], cache)  # 5 queries over 9 keys: the causal offset matters
    np.testing.assert_allclose(logits, model(idx)[0][:, -1], rtol=0, atol=1e-10)


def test_a_step_reads_the_prefix_from_the_cache_and_does_not_recompute_it():
    """After prefill, changing the prompt's position embeddings changes what a full forward
    sees, but not a decode step: the prompt's keys and values come from the cache."""
    model = tiny()
    idx = np.random.default_rng(2).integers(0, V, (2, 6))
    cache = KVCache(model, 2)
    prefill(model, idx, cache)
    token = np.array([1, 2])
    before = decode_step(model, token, cache)
    cache.length -= 1  # the same step again, into the same slot
    # a random change (a constant shift along C would vanish in ln_1)
    model.params["wpe.weight"][:6] += np.random.default_rng(3).standard_normal((6, 8))
    after = decode_step(model, token, cache)
    np.testing.assert_array_equal(before, after)
    full = model(np.concatenate([idx, token[:, None]], axis=1))[0][:, -1]
    assert np.abs(full - after).max() > 1e-3


def test_float32_stays_float32_and_cache_memory_formula():
    model = tiny(dtype="float32")
    cache = KVCache(model, batch_size=3, max_len=10)
    logits = prefill(model, np.zeros((3, 2), dtype=int), cache)
    assert logits.dtype == np.float32 and decode_step(model, np.zeros(3, dtype=int), cache).dtype == np.float32
    L, C = model.config.n_layer, model.config.n_embd
    assert cache.k[0].shape == (3, 2, 10, 4)
    assert cache.nbytes == 2 * L * 3 * 10 * C * 4


# ---------------------------------------------------------------------- Hugging Face reference


def hf_from(model):
    """A GPT2LMHeadModel in float64 holding our model's weights (Conv1D layout: no transposes)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = model.config
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=None, eos_token_id=None, tie_word_embeddings=cfg.tie_weights)
    hf = transformers.GPT2LMHeadModel(hf_cfg).double().eval()
    state = {f"transformer.{k}": torch.tensor(v) for k, v in model.params.items() if k != "lm_head.weight"}
    state["lm_head.weight"] = torch.tensor(model.lm_weight())
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all(".attn.bias" in k or "masked_bias" in k for k in missing), (missing, unexpected)
    return torch, hf


@pytest.mark.parametrize("tie", [True, False])
def test_greedy_matches_hugging_face_generate(tie):
    model = tiny(tie_weights=tie)
    torch, hf = hf_from(model)
    idx = np.random.default_rng(4).integers(0, V, (2, 5))
    ours = generate(model, idx, 15, temperature=0)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor(idx), do_sample=False, max_new_tokens=15, pad_token_id=0,
                             attention_mask=torch.ones(idx.shape, dtype=torch.long))
    np.testing.assert_array_equal(ours, theirs.numpy())
    assert len(np.unique(ours[:, 5:])) > 1  # a real continuation, not one repeated token


def test_stop_token_matches_hugging_face_eos_handling():
    """HF pads a finished row with pad_token_id and stops when every row is done: with
    pad = eos = our stop token, the outputs are identical."""
    model = tiny()
    torch, hf = hf_from(model)
    idx = np.random.default_rng(5).integers(0, V, (2, 4))
    free = generate(model, idx, 16, temperature=0)
    stop = int(free[0, 6])  # row 0 produces it at its third new token
    ours = generate(model, idx, 16, temperature=0, stop_token=stop)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor(idx), do_sample=False, max_new_tokens=16, eos_token_id=stop,
                             pad_token_id=stop, attention_mask=torch.ones(idx.shape, dtype=torch.long))
    np.testing.assert_array_equal(ours, theirs.numpy())


# ---------------------------------------------------------------------- sampling


def brute_top_k(logits, k):
    """Tokens with fewer than k tokens strictly above them (ties at the boundary all stay)."""
    return {i for i in range(len(logits)) if sum(l > logits[i] for l in logits) < k}


def brute_top_p(probs, p):
    """The smallest number m of tokens that can reach mass p; of the size-m sets, the most
    probable one (found by enumerating every subset)."""
    n = len(probs)
    for m in range(1, n + 1):
        sets = [s for s in itertools.combinations(range(n), m) if sum(probs[list(s)]) >= p - 1e-12]
        if sets:
            return set(max(sets, key=lambda s: sum(probs[list(s)])))
    raise AssertionError("unreachable")


def draw(logits, n, seed=0, **kw):
    """n draws from one row of logits, as n rows of one batch."""
    return sample_next(np.tile(logits, (n, 1)), np.random.default_rng(seed), **kw)


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def check_draws(ids, allowed, probs, n):
    """The drawn tokens are exactly `allowed`, at frequencies near the renormalised probs."""
    assert set(np.unique(ids).tolist()) == allowed
    want = np.zeros_like(probs)
    want[list(allowed)] = probs[list(allowed)]
    want /= want.sum()
    freq = np.bincount(ids, minlength=len(probs)) / n
    sigma = np.sqrt(want * (1 - want) / n)
    assert np.all(np.abs(freq - want) <= 5 * sigma + 1e-12), (freq, want)


LOGITS = np.array([1.2, -0.3, 2.0, 0.5, 0.9, -1.0, 1.6])


@pytest.mark.parametrize("k", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_top_k_against_enumeration(k, temperature):
    n = 40_000
    ids = draw(LOGITS, n, temperature=temperature, top_k=k)
    check_draws(ids, brute_top_k(LOGITS, k), softmax(LOGITS / temperature), n)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.75, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_top_p_against_enumeration(p, temperature):
    n = 40_000
    probs = softmax(LOGITS / temperature)
    ids = draw(LOGITS, n, temperature=temperature, top_p=p)
    check_draws(ids, brute_top_p(probs, p), probs, n)


def test_top_k_then_top_p_against_enumeration():
    n = 40_000
    kept_k = sorted(brute_top_k(LOGITS, 4))
    sub = softmax(LOGITS[kept_k])  # the distribution after top-k
    kept = {kept_k[i] for i in brute_top_p(sub, 0.7)}
    check_draws(draw(LOGITS, n, top_k=4, top_p=0.7), kept, softmax(LOGITS), n)


def test_the_token_that_crosses_p_is_kept():
    probs = sampling_probs(np.log([[0.5, 0.3, 0.2]]), top_p=0.6)[0]
    np.testing.assert_allclose(probs, [0.625, 0.375, 0.0])


def test_top_k_keeps_every_token_tied_with_the_kth():
    probs = sampling_probs(np.array([[2.0, 1.0, 1.0, 0.0]]), top_k=2)[0]
    assert (probs > 0).tolist() == [True, True, True, False]


def test_greedy_is_argmax_with_lowest_id_on_ties():
    logits = np.array([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    assert sample_next(logits, None, temperature=0).tolist() == [1, 0]


def test_high_temperature_flattens_low_temperature_sharpens():
    p_hot = sampling_probs(LOGITS[None], temperature=100.0)[0]
    p_cold = sampling_probs(LOGITS[None], temperature=0.05)[0]
    assert p_hot.max() - p_hot.min() < 0.01
    assert p_cold[np.argmax(LOGITS)] > 0.99


# ---------------------------------------------------------------------- generate


def test_same_seed_same_output_other_seed_other_output():
    model = tiny()
    idx = np.random.default_rng(6).integers(0, V, (3, 3))
    a = generate(model, idx, 12, seed=7, top_k=8, top_p=0.95)
    b = generate(model, idx, 12, seed=7, top_k=8, top_p=0.95)
    c = generate(model, idx, 12, seed=8, top_k=8, top_p=0.95)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (3, 15) and np.array_equal(a[:, :3], idx)
    assert not np.array_equal(a, c)


def test_stop_token_pads_a_finished_row_and_leaves_the_others_alone():
    model = tiny()
    idx = np.random.default_rng(7).integers(0, V, (4, 3))
    free = generate(model, idx, 15, seed=1)
    stop = int(free[0, 5])  # row 0's third new token
    out = generate(model, idx, 15, seed=1, stop_token=stop)
    for row in range(4):
        hits = np.flatnonzero(free[row, 3:] == stop)
        if len(hits) == 0:  # never stops: the same tokens as without a stop token
            np.testing.assert_array_equal(out[row], free[row, :out.shape[1]])
        else:
            end = 3 + hits[0]
            np.testing.assert_array_equal(out[row, :end + 1], free[row, :end + 1])
            assert np.all(out[row, end + 1:] == stop)
    assert np.all(out[0, 6:] == stop) and out.shape[1] <= 18


def test_all_rows_stopped_ends_early():
    model = tiny()
    idx = np.array([[1, 2, 3]])
    free = generate(model, idx, 10, temperature=0)
    stop = int(free[0, 4])
    out = generate(model, idx, 10, temperature=0, stop_token=stop)
    first = 3 + int(np.flatnonzero(free[0, 3:] == stop)[0])
    assert out.shape == (1, first + 1) and out[0, -1] == stop


def test_zero_new_tokens_returns_the_prompt():
    idx = np.array([[1, 2]])
    np.testing.assert_array_equal(generate(tiny(), idx, 0), idx)


# ---------------------------------------------------------------------- transition statistics


def test_transition_counts_and_tv():
    samples = np.array([[0, 1, 0, 1, 2], [1, 1, 2, 0, 3]])  # 3 is not a chain token: pair dropped
    counts = transition_counts(samples, 3)
    np.testing.assert_array_equal(counts, [[0, 2, 0], [1, 1, 2], [1, 0, 0]])
    A = counts / counts.sum(axis=1, keepdims=True)
    assert transition_tv(samples, A) == pytest.approx(0.0, abs=1e-15)
    uniform = np.full((3, 3), 1 / 3)
    # row 0: |0-1/3|+|1-1/3|+|0-1/3| = 4/3 -> TV 2/3; row 1: 1/3 + 1/12 ... weighted by n_i
    tv_rows = 0.5 * np.abs(A - uniform).sum(axis=1)
    assert transition_tv(samples, uniform) == pytest.approx((tv_rows * counts.sum(axis=1)).sum() / 7)


def test_transition_tv_per_topic_sees_a_wrong_chain():
    rng = np.random.default_rng(0)
    Vt = 5
    A = rng.dirichlet(np.full(Vt, 0.3), size=(2, Vt))  # (2, V, V) two distinct chains
    chains = MarkovMixture(np.full((2, Vt), 1 / Vt), A)
    samples, topics = chains.sample(rng, 400, 30)
    right = transition_tv(samples, A, topics)
    wrong = transition_tv(samples, A, 1 - topics)
    assert right < 0.05 < 0.3 < wrong


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.5), "temperature must be a finite number >= 0, got -0.5"),
        (dict(temperature=float("nan")), "temperature must be a finite number >= 0, got nan"),
        (dict(top_k=0), "top_k must be an integer >= 1 or None, got 0"),
        (dict(top_k=2.5), "top_k must be an integer >= 1 or None, got 2.5"),
        (dict(top_p=0.0), "top_p must be a number in (0, 1] or None, got 0.0"),
        (dict(top_p=1.5), "top_p must be a number in (0, 1] or None, got 1.5"),
    ],
)
def test_bad_sampling_settings(kwargs, message):
    for call in (lambda: sample_next(np.zeros((1, 3)), np.random.default_rng(0), **kwargs),
                 lambda: generate(tiny(), np.array([[1]]), 2, **kwargs)):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == message


@pytest.mark.parametrize(
    "idx, n, kwargs, message",
    [
        (np.zeros((1, 25), dtype=int), 0, {}, "prompt length 25 exceeds block_size 24"),
        (np.zeros((2, 20), dtype=int), 5, {}, "prompt length 20 + max_new_tokens 5 = 25 exceeds block_size 24"),
        (np.zeros((1, 2), dtype=int), -1, {}, "max_new_tokens must be an integer >= 0, got -1"),
        (np.zeros(3, dtype=int), 2, {}, "idx must be a 2-D integer array (B, T) with T >= 1, got shape (3,) dtype int64"),
        (np.zeros((1, 0), dtype=int), 2, {}, "idx must be a 2-D integer array (B, T) with T >= 1, got shape (1, 0) dtype int64"),
        (np.array([[1, 13]]), 2, {}, "idx holds token id 13, outside the vocabulary [0, 13)"),
        (np.array([[1, 2]]), 2, dict(stop_token=13), "stop_token must be a token id in [0, 13), got 13"),
    ],
)
def test_bad_generate_input(idx, n, kwargs, message):
    with pytest.raises(ValueError) as err:
        generate(tiny(), idx, n, **kwargs)
    assert str(err.value) == message


def test_other_heads_are_refused():
    model = tiny(head="sequence", n_classes=3)
    with pytest.raises(ValueError) as err:
        generate(model, np.array([[1, 2]]), 2)
    assert str(err.value) == ("generate needs a model with the LM head, this one has the 'sequence' head "
                              "(switch with model.set_head('lm'))")


def test_bad_cache_use():
    model = tiny()
    with pytest.raises(ValueError, match=r"^max_len must be an integer in \[1, block_size 24\], got 30$"):
        KVCache(model, 1, max_len=30)
    with pytest.raises(ValueError, match=r"^batch_size must be an integer >= 1, got 0$"):
        KVCache(model, 0)
    cache = KVCache(model, 2, max_len=3)
    with pytest.raises(ValueError, match=r"^idx has batch size 1 but the cache was made for 2$"):
        prefill(model, np.zeros((1, 2), dtype=int), cache)
    with pytest.raises(ValueError, match=r"^4 new positions after 0 cached exceed the cache's max_len 3$"):
        prefill(model, np.zeros((2, 4), dtype=int), cache)
    prefill(model, np.zeros((2, 3), dtype=int), cache)
    with pytest.raises(ValueError, match=r"^the cache is full: 3 positions, max_len 3$"):
        decode_step(model, np.zeros(2, dtype=int), cache)
    with pytest.raises(ValueError, match=r"^token must be an integer array of shape \(2,\), got shape \(2, 1\)"):
        decode_step(model, np.zeros((2, 1), dtype=int), cache)


def test_bad_logits_and_transition_input():
    with pytest.raises(ValueError, match=r"^logits must be a 2-D array \(B, V\), got shape \(3,\)$"):
        sample_next(np.zeros(3), np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"^samples must be a 2-D array \(N, T\), got shape \(4,\)$"):
        transition_counts(np.zeros(4, dtype=int), 3)
    with pytest.raises(ValueError, match=r"^K chains need topics of shape \(2,\), got None$"):
        transition_tv(np.zeros((2, 4), dtype=int), np.full((2, 3, 3), 1 / 3))
