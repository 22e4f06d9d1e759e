"""Text generation with a KV cache: prefill the prompt once, then one token per step.

    cache = KVCache(model, batch_size=B)
    logits = prefill(model, idx, cache)          # (B, V): the prompt, every block, once
    for each new token:
        token = sample_next(logits, rng, temperature, top_k, top_p)    # (B,)
        logits = decode_step(model, token, cache)                      # (B, V)

A step of `decode_step` pushes ONE position through the blocks: its own q, k, v come from a
(B, 1, C) projection, its k and v are appended to the cache, and its single query attends
over the cached keys. That is O(T) work in attention and (B, C)-sized matmuls per step,
where recomputing the whole prefix with `model(idx)` costs O(T^2) attention and
(B, T, C)-sized matmuls. `generate` puts it together, with a stop token and a seed.

The math is the model's (docs/model.md): pre-LayerNorm blocks, LayerNorm eps 1e-5, GELU
tanh, attention scaled by 1/sqrt(HS), inference mode (no dropout). Only the model's public
surface is used: `model.params`, `model.config`, `model.lm_weight()`.

Also here: `transition_counts` and `transition_tv`, to compare sampled text with the true
Markov chains of the synthetic source task, and `plot_sampling`, which draws
docs/figures/sampling.png.

Sizes: B batch, T time, C channels, NH heads, HS head size (C = NH * HS), V vocabulary,
L blocks. Docs: docs/kv_cache.md (the cache) and docs/sampling.md (sampling).
"""
from __future__ import annotations

import math

import numpy as np

from .layers import gelu_forward, layernorm_forward, linear_forward


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# ----------------------------------------------------------------------------------------
# the cache


class KVCache:
    """Keys and values of every position seen so far, per block, preallocated.

        k[i], v[i]   (B, NH, max_len, HS)   block i's keys and values; slots 0..length-1 hold data
        length       positions written so far (the next token's position)

    Memory: 2 * L * B * max_len * C numbers (K and V, every block, every slot), e.g.
    GPT-2 small (L 12, C 768) at max_len 1024, B 1, float32: 2*12*1024*768*4 B = 75.5 MB.
    The arrays are allocated once, so a step writes one slot instead of growing an array
    (np.concatenate would copy the whole cache every step: O(T) copies per step, O(T^2)
    in all). See docs/kv_cache.md#what-the-cache-holds.
    """

    def __init__(self, model, batch_size: int, max_len: int | None = None):
        cfg = model.config
        max_len = cfg.block_size if max_len is None else max_len
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not _is_int(max_len) or not 1 <= max_len <= cfg.block_size:
            raise ValueError(f"max_len must be an integer in [1, block_size {cfg.block_size}], got {max_len!r}")
        NH, HS = cfg.n_head, cfg.n_embd // cfg.n_head
        dtype = model.params["wte.weight"].dtype
        shape = (batch_size, NH, max_len, HS)
        self.k = [np.zeros(shape, dtype=dtype) for _ in range(cfg.n_layer)]  # L x (B, NH, max_len, HS)
        self.v = [np.zeros(shape, dtype=dtype) for _ in range(cfg.n_layer)]  # L x (B, NH, max_len, HS)
        self.batch_size = batch_size
        self.max_len = max_len
        self.length = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the K and V arrays: 2 * L * B * max_len * C * itemsize."""
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)


# ----------------------------------------------------------------------------------------
# prefill and decode: the blocks on new positions only


def _check_lm(model, what: str) -> None:
    head = model.config.head
    if head != "lm":
        raise ValueError(
            f"{what} needs a model with the LM head, this one has the {head!r} head "
            "(switch with model.set_head('lm'))"
        )


def _attend(q, k, v, offset):
    """Attention of Tq new queries over all cached keys.  q (B, NH, Tq, HS), k and v
    (B, NH, Tk, HS) with Tk = offset + Tq  ->  y (B, NH, Tq, HS).

        att = softmax(q k^T / sqrt(HS))      y = att v

    For one query (a decode step) every cached key is in the past, so there is no mask
    and the work is Tk * HS per head: O(T). Several queries (a prompt) need the causal
    mask: query t (position offset + t) sees keys 0 .. offset + t.
    """
    Tq, Tk, HS = q.shape[2], k.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(HS)  # a Python float: keeps float32 float32
    preatt = (q * scale) @ k.transpose(0, 1, 3, 2)  # (B, NH, Tq, Tk)
    if Tq > 1:
        future = np.arange(Tk)[None, :] > offset + np.arange(Tq)[:, None]  # (Tq, Tk) True = masked
        preatt[..., future] = -np.inf
    preatt -= preatt.max(axis=-1, keepdims=True)  # exp never overflows; each row has a real key
    att = np.exp(preatt)  # (B, NH, Tq, Tk)
    att /= att.sum(axis=-1, keepdims=True)
    return att @ v  # (B, NH, Tq, HS)


def _forward_new(model, idx, cache):
    """Run new positions cache.length .. cache.length + Tq - 1 through every block,
    appending their k and v to the cache. idx (B, Tq) -> logits of the last one (B, V)."""
    cfg, p = model.config, model.params
    B, Tq = idx.shape
    NH = cfg.n_head
    C = cfg.n_embd
    HS = C // NH
    t0 = cache.length
    # the embedding at the positions these tokens actually occupy, not at 0 .. Tq-1
    x = p["wte.weight"][idx] + p["wpe.weight"][t0:t0 + Tq]  # (B, Tq, C)
    for i in range(cfg.n_layer):
        pre = f"h.{i}."
        ln1, _ = layernorm_forward(x, p[pre + "ln_1.weight"], p[pre + "ln_1.bias"])  # (B, Tq, C)
        qkv, _ = linear_forward(ln1, p[pre + "attn.c_attn.weight"], p[pre + "attn.c_attn.bias"])  # (B, Tq, 3C)
        q, k, v = qkv.reshape(B, Tq, 3, NH, HS).transpose(2, 0, 3, 1, 4)  # each (B, NH, Tq, HS)
        # append: the new keys and values go into their slots; the old ones are never recomputed
        cache.k[i][:, :, t0:t0 + Tq] = k
        cache.v[i][:, :, t0:t0 + Tq] = v
        y = _attend(q, cache.k[i][:, :, :t0 + Tq], cache.v[i][:, :, :t0 + Tq], t0)  # (B, NH, Tq, HS)
        y = y.transpose(0, 2, 1, 3).reshape(B, Tq, C)  # (B, Tq, C) heads side by side again
        attproj, _ = linear_forward(y, p[pre + "attn.c_proj.weight"], p[pre + "attn.c_proj.bias"])  # (B, Tq, C)
        x = x + attproj  # (B, Tq, C) residual
        ln2, _ = layernorm_forward(x, p[pre + "ln_2.weight"], p[pre + "ln_2.bias"])  # (B, Tq, C)
        fch, _ = linear_forward(ln2, p[pre + "mlp.c_fc.weight"], p[pre + "mlp.c_fc.bias"])  # (B, Tq, 4C)
        fch_gelu, _ = gelu_forward(fch)  # (B, Tq, 4C)
        fcproj, _ = linear_forward(fch_gelu, p[pre + "mlp.c_proj.weight"], p[pre + "mlp.c_proj.bias"])  # (B, Tq, C)
        x = x + fcproj  # (B, Tq, C) residual
    cache.length = t0 + Tq
    # only the last position's logits are needed to sample: one (B, C) x (C, V) product,
    # not Tq of them
    h, _ = layernorm_forward(x[:, -1], p["ln_f.weight"], p["ln_f.bias"])  # (B, C)
    return h @ model.lm_weight().T  # (B, V)


def _check_tokens(model, idx, name: str) -> None:
    V = model.config.vocab_size
    if idx.size and (idx.min() < 0 or idx.max() >= V):
        bad = int(idx[(idx < 0) | (idx >= V)][0])
        raise ValueError(f"{name} holds token id {bad}, outside the vocabulary [0, {V})")


def prefill(model, idx, cache: KVCache):
    """Run the prompt idx (B, T) through every block once, storing each block's k and v.

    Returns the logits of the last position (B, V): the distribution of the first new
    token. Usually called on an empty cache; on a filled one it appends the T positions
    after those already cached (a prompt fed in chunks gives the same logits).
    """
    _check_lm(model, "prefill")
    idx = np.asarray(idx)
    if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer) or idx.shape[1] < 1:
        raise ValueError(f"idx must be a 2-D integer array (B, T) with T >= 1, got shape {idx.shape} dtype {idx.dtype}")
    if idx.shape[0] != cache.batch_size:
        raise ValueError(f"idx has batch size {idx.shape[0]} but the cache was made for {cache.batch_size}")
    if cache.length + idx.shape[1] > cache.max_len:
        raise ValueError(
            f"{idx.shape[1]} new positions after {cache.length} cached exceed the cache's max_len {cache.max_len}"
        )
    _check_tokens(model, idx, "idx")
    return _forward_new(model, idx, cache)


def decode_step(model, token, cache: KVCache):
    """Run ONE new token per row, token (B,), at position cache.length. Returns logits (B, V).

    Per block: ln_1 -> c_attn on (B, 1, C) -> append k, v -> the single query attends over
    all cached keys (no mask: they are all in the past) -> c_proj -> residual -> ln_2 ->
    MLP -> residual; then ln_f and the LM head. O(T) attention work, no prefix recompute.
    See docs/kv_cache.md#one-step-costs-ot.
    """
    _check_lm(model, "decode_step")
    token = np.asarray(token)
    if token.shape != (cache.batch_size,) or not np.issubdtype(token.dtype, np.integer):
        raise ValueError(
            f"token must be an integer array of shape ({cache.batch_size},), got shape {token.shape} dtype {token.dtype}"
        )
    if cache.length >= cache.max_len:
        raise ValueError(f"the cache is full: {cache.length} positions, max_len {cache.max_len}")
    _check_tokens(model, token, "token")
    return _forward_new(model, token[:, None], cache)


# ----------------------------------------------------------------------------------------
# sampling


def _check_sampling(temperature, top_k, top_p) -> None:
    if not isinstance(temperature, (int, float, np.integer, np.floating)) or isinstance(temperature, bool) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float, np.integer, np.floating))
                              or isinstance(top_p, bool) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")


def sampling_probs(logits, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None):
    """The distribution `sample_next` draws from: logits (B, V) -> probs (B, V), float64.

        p = softmax(logits / temperature)
        top_k: zero every token whose logit is below the k-th largest; ties with the k-th
               largest are all kept, so more than k tokens can survive (as Hugging Face's
               TopKLogitsWarper does)
        top_p: sort by p, descending (equal p: lower id first); keep token j while the mass
               of the tokens before it is < top_p. That is the smallest set of most probable
               tokens whose mass reaches top_p, the token that crosses top_p included
        renormalise what is left to sum to 1

    Applied in this order (temperature, top-k, top-p), as Hugging Face applies them.
    Computed in float64: a cumulative sum over 50k float32 probabilities loses the tail.
    temperature must be > 0 here; 0 (greedy) is handled by `sample_next`. docs/sampling.md
    """
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        raise ValueError("temperature 0 is greedy decoding: it has no distribution to return (use sample_next)")
    z = np.asarray(logits, dtype=np.float64) / float(temperature)  # (B, V)
    if z.ndim != 2:
        raise ValueError(f"logits must be a 2-D array (B, V), got shape {z.shape}")
    keep = np.ones(z.shape, dtype=bool)  # (B, V)
    if top_k is not None and top_k < z.shape[1]:
        kth = np.partition(z, -top_k, axis=1)[:, -top_k, None]  # (B, 1) the k-th largest logit
        keep &= z >= kth
    probs = np.exp(z - z.max(axis=1, keepdims=True))  # (B, V)
    probs *= keep
    probs /= probs.sum(axis=1, keepdims=True)
    if top_p is not None and top_p < 1:
        order = np.argsort(-probs, axis=1, kind="stable")  # (B, V) most probable first, ties by id
        sorted_p = np.take_along_axis(probs, order, axis=1)  # (B, V)
        before = np.cumsum(sorted_p, axis=1) - sorted_p  # (B, V) mass of the tokens ahead
        nucleus = np.zeros(z.shape, dtype=bool)  # (B, V)
        # the first token always stays (before = 0); tokens top-k removed have p = 0 already
        np.put_along_axis(nucleus, order, before < top_p, axis=1)
        probs *= nucleus
        probs /= probs.sum(axis=1, keepdims=True)
    return probs


def sample_next(logits, rng, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None):
    """One token per row from logits (B, V) -> ids (B,) int64.

    temperature 0: greedy, argmax (equal logits: the lowest id, like torch.argmax); top_k and
    top_p change nothing then. Otherwise one draw per row from `sampling_probs`, by inverse
    CDF with one uniform per row, so the rng advances by exactly B numbers per call.
    """
    _check_sampling(temperature, top_k, top_p)
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must be a 2-D array (B, V), got shape {logits.shape}")
    if temperature == 0:
        return logits.argmax(axis=1).astype(np.int64)  # (B,) the first maximum
    probs = sampling_probs(logits, temperature, top_k, top_p)  # (B, V)
    cdf = np.cumsum(probs, axis=1)  # (B, V)
    cdf /= cdf[:, -1:]  # the last entry exactly 1, so u < 1 never runs past the last kept token
    u = rng.random((len(cdf), 1))  # (B, 1)
    # the id j with cdf[j-1] <= u < cdf[j]; a removed token has cdf[j] = cdf[j-1], never chosen
    return (u >= cdf).sum(axis=1).astype(np.int64)  # (B,)


# ----------------------------------------------------------------------------------------
# the generation loop


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None, stop_token=None):
    """Continue every prompt row by up to max_new_tokens tokens. idx (B, T) -> (B, T + n).

    One `prefill` of the prompt, then one `decode_step` per further token, each new token
    drawn by `sample_next`. stop_token: a row that produces it is finished, its later
    positions hold stop_token; once every row has finished, generation stops early, so
    n <= max_new_tokens. The same seed gives the same output. See docs/sampling.md.
    """
    _check_lm(model, "generate")
    _check_sampling(temperature, top_k, top_p)
    cfg = model.config
    idx = np.asarray(idx)
    if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer) or idx.shape[1] < 1:
        raise ValueError(f"idx must be a 2-D integer array (B, T) with T >= 1, got shape {idx.shape} dtype {idx.dtype}")
    B, T = idx.shape
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if T > cfg.block_size:
        raise ValueError(f"prompt length {T} exceeds block_size {cfg.block_size}")
    if T + max_new_tokens > cfg.block_size:
        raise ValueError(
            f"prompt length {T} + max_new_tokens {max_new_tokens} = {T + max_new_tokens} exceeds block_size {cfg.block_size}"
        )
    if stop_token is not None and (not _is_int(stop_token) or not 0 <= stop_token < cfg.vocab_size):
        raise ValueError(f"stop_token must be a token id in [0, {cfg.vocab_size}), got {stop_token!r}")
    _check_tokens(model, idx, "idx")
    rng = np.random.default_rng(seed)
    out = np.empty((B, T + max_new_tokens), dtype=np.int64)  # (B, T + max_new_tokens)
    out[:, :T] = idx
    if max_new_tokens == 0:
        return out
    cache = KVCache(model, B, T + max_new_tokens)  # exactly the slots this call needs
    logits = prefill(model, idx, cache)  # (B, V)
    done = np.zeros(B, dtype=bool)  # (B,)
    for n in range(max_new_tokens):
        token = sample_next(logits, rng, temperature, top_k, top_p)  # (B,)
        if stop_token is not None:
            token = np.where(done, stop_token, token)  # a finished row only repeats stop_token
            done |= token == stop_token
        out[:, T + n] = token
        if done.all():
            return out[:, :T + n + 1]
        if n + 1 < max_new_tokens:  # the last token needs no logits after it
            logits = decode_step(model, token, cache)
    return out


# ----------------------------------------------------------------------------------------
# comparing samples with the true chains (synthetic source task, src/transferlab/tasks.py)


def transition_counts(samples, n_tokens: int):
    """counts[i, j] = how often token j follows token i in the rows of samples (N, T).

    Only pairs of chain tokens count (both ids < n_tokens): a PAD or CLS id, or any id the
    chains never emit, breaks the pair. Returns an (n_tokens, n_tokens) int64 array.
    """
    samples = np.asarray(samples)
    if samples.ndim != 2:
        raise ValueError(f"samples must be a 2-D array (N, T), got shape {samples.shape}")
    a, b = samples[:, :-1].ravel(), samples[:, 1:].ravel()  # (N*(T-1),) each
    ok = (a >= 0) & (a < n_tokens) & (b >= 0) & (b < n_tokens)
    counts = np.zeros((n_tokens, n_tokens), dtype=np.int64)
    np.add.at(counts, (a[ok], b[ok]), 1)  # add.at: a repeated pair must count every time
    return counts


def transition_tv(samples, transitions, topics=None) -> float:
    """Mean total-variation distance between observed and true next-token distributions.

        TV_i = 1/2 sum_j |counts[i, j] / n_i - A[i, j]|,    n_i = sum_j counts[i, j]
        result = sum_i n_i TV_i / sum_i n_i          (rows weighted by how often they occur)

    transitions: one chain A (V, V), or K chains (K, V, V) with topics (N,) naming the chain
    each sample row came from (its counts are compared with that chain only). 0 is a perfect
    match; even exact samples from A score above 0 when the counts are few (sampling noise),
    so compare against samples of the chain itself (docs/sampling.md#do-samples-follow-the-chains).
    """
    A = np.asarray(transitions, dtype=np.float64)
    samples = np.asarray(samples)
    if A.ndim == 2:
        A, topics = A[None], np.zeros(len(samples), dtype=np.int64)
    if A.ndim != 3 or A.shape[1] != A.shape[2]:
        raise ValueError(f"transitions must have shape (V, V) or (K, V, V), got {A.shape}")
    if topics is None or np.shape(topics) != (len(samples),):
        raise ValueError(f"K chains need topics of shape ({len(samples)},), got {None if topics is None else np.shape(topics)}")
    topics = np.asarray(topics)
    total, weighted = 0, 0.0
    for k in range(A.shape[0]):
        counts = transition_counts(samples[topics == k], A.shape[1])  # (V, V)
        n = counts.sum(axis=1)  # (V,)
        seen = n > 0
        tv = 0.5 * np.abs(counts[seen] / n[seen, None] - A[k][seen]).sum(axis=1)  # (rows seen,)
        weighted += float((n[seen] * tv).sum())
        total += int(n.sum())
    if total == 0:
        raise ValueError("samples hold no pair of consecutive chain tokens")
    return weighted / total


# ----------------------------------------------------------------------------------------
# the figure of docs/sampling.md


def plot_sampling(path) -> None:
    """Draw docs/figures/sampling.png: one made-up next-token distribution over 12 tokens,
    under three temperatures, top-k and top-p. Regenerate with
    `PYTHONPATH=src python -c "from transferlab.generate import plot_sampling; plot_sampling('docs/figures/sampling.png')"`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logits = np.array([[3.0, 2.4, 2.0, 1.6, 1.5, 1.0, 0.6, 0.3, 0.0, -0.5, -1.0, -2.0]])  # (1, 12)
    panels = [
        ("temperature 0.5", dict(temperature=0.5)),
        ("temperature 1", dict(temperature=1.0)),
        ("temperature 2", dict(temperature=2.0)),
        ("top_k 4", dict(top_k=4)),
        ("top_p 0.8", dict(top_p=0.8)),
    ]
    base = sampling_probs(logits)[0]  # (12,) temperature 1, nothing removed
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 2.8), sharey=True)
    ids = np.arange(logits.shape[1])
    for ax, (title, kw) in zip(axes, panels):
        p = sampling_probs(logits, **kw)[0]  # (12,)
        ax.bar(ids, base, color="0.85", label="softmax(logits)")
        ax.bar(ids, p, width=0.5, color="tab:blue", label="sampled from")
        ax.set_title(title)
        ax.set_xlabel("token id")
        ax.set_xticks(ids[::2])
    axes[0].set_ylabel("probability")
    axes[0].legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
