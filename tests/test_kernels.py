"""Every fast kernel (kernels.py) equals the plain form of layers.py it names, forward and
backward, in float64 (to 1e-12) and float32 (to its rounding); the model gives the same
numbers with either kernel table."""
import numpy as np
import pytest

from transferlab import GPT, GPTConfig
from transferlab import layers as L
from transferlab.kernels import FAST, KERNELS, PLAIN, KernelTable, kernel_table, softmax_lastdim_inplace

TOL = {np.float64: 1e-12, np.float32: 2e-5}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gelu_fast_equals_plain(dtype):
    r = np.random.default_rng(0)
    x = (3 * r.standard_normal((3, 5, 16))).astype(dtype)
    dout = r.standard_normal(x.shape).astype(dtype)
    out, cache = FAST.gelu_forward(x)
    ref, ref_cache = PLAIN.gelu_forward(x)
    np.testing.assert_allclose(out, ref, rtol=TOL[dtype], atol=TOL[dtype])
    (dx,) = FAST.gelu_backward(dout, cache)
    (dx_ref,) = PLAIN.gelu_backward(dout, ref_cache)
    np.testing.assert_allclose(dx, dx_ref, rtol=TOL[dtype], atol=TOL[dtype])
    assert out.dtype == dx.dtype == dtype


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_layernorm_fast_equals_plain(dtype):
    r = np.random.default_rng(1)
    x, dout = r.standard_normal((2, 2, 3, 8)).astype(dtype)
    w, b = r.standard_normal((2, 8)).astype(dtype)
    out, cache = FAST.layernorm_forward(x, w, b)
    ref, ref_cache = PLAIN.layernorm_forward(x, w, b)
    np.testing.assert_allclose(out, ref, rtol=TOL[dtype], atol=TOL[dtype])
    for got, want in zip(FAST.layernorm_backward(dout, cache), PLAIN.layernorm_backward(dout, ref_cache)):
        np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype])
        assert got.dtype == dtype


def test_softmax_in_place_equals_the_plain_softmax():
    x = np.random.default_rng(2).standard_normal((2, 3, 4, 5))
    x[0, 0, 1, 2:] = -np.inf  # a partly masked row
    x[1, 2, 3, :] = -np.inf  # a fully masked row comes out as zeros
    want = L.softmax(x)
    got = softmax_lastdim_inplace(x.copy())
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-300)
    assert not got[1, 2, 3].any() and np.allclose(got[0, 0, 0].sum(), 1.0)


@pytest.mark.parametrize("causal, padded", [(True, False), (False, True), (True, True), (False, False)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_attention_fast_equals_plain(causal, padded, dtype):
    r = np.random.default_rng(3)
    B, T, C, NH = 3, 6, 8, 2
    qkv = r.standard_normal((B, T, 3 * C)).astype(dtype)
    dy = r.standard_normal((B, T, C)).astype(dtype)
    pad = None
    if padded:
        pad = np.ones((B, T), dtype=bool)
        pad[0, 4:] = False
        pad[2, :] = False  # a fully padded row
    allowed = L.attention_mask(T, causal, pad)
    y, cache = FAST.attention_forward(qkv, NH, allowed)
    y_ref, ref_cache = PLAIN.attention_forward(qkv, NH, allowed)
    np.testing.assert_allclose(y, y_ref, rtol=TOL[dtype], atol=TOL[dtype])
    (dqkv,) = FAST.attention_backward(dy, cache)
    (dqkv_ref,) = PLAIN.attention_backward(dy, ref_cache)
    np.testing.assert_allclose(dqkv, dqkv_ref, rtol=TOL[dtype], atol=TOL[dtype])
    assert y.dtype == dqkv.dtype == dtype
    if padded:
        assert not y[2].any()  # a row with no allowed key gives zeros, not NaN


def test_attention_with_dropout_fast_equals_plain():
    """The same dropout mask (same RNG state) in both forms gives the same numbers."""
    r = np.random.default_rng(4)
    qkv, dy = r.standard_normal((2, 5, 24)), r.standard_normal((2, 5, 8))
    allowed = L.attention_mask(5, True)
    y, cache = FAST.attention_forward(qkv, 2, allowed, 0.3, np.random.default_rng(9))
    y_ref, ref_cache = PLAIN.attention_forward(qkv, 2, allowed, 0.3, np.random.default_rng(9))
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(FAST.attention_backward(dy, cache)[0],
                               PLAIN.attention_backward(dy, ref_cache)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("head, vocab", [("lm", 11), ("sequence", 11), ("lm", 40)])
def test_the_model_gives_the_same_numbers_with_either_table(head, vocab):
    """vocab 40 > the batch's 24 positions: the tied embedding's gradient takes the rows form."""
    cfg = GPTConfig(vocab_size=vocab, block_size=8, n_layer=2, n_head=2, n_embd=8, dtype="float64",
                    head=head, n_classes=3, dropout=0.1)
    r = np.random.default_rng(5)
    idx = r.integers(0, 11, (3, 8))
    y = r.integers(0, 11, (3, 8)) if head == "lm" else r.integers(0, 3, 3)
    fast, plain = GPT(cfg, seed=1), GPT(cfg, seed=1, kernels="plain")
    assert fast.kernels is FAST and plain.kernels is PLAIN
    lf, loss_f = fast(idx, y)
    lp, loss_p = plain(idx, y)
    np.testing.assert_allclose(lf, lp, rtol=1e-12, atol=1e-12)
    assert loss_f == pytest.approx(loss_p, rel=1e-12)
    gf, gp = fast.backward(), plain.backward()
    for name in gf:
        np.testing.assert_allclose(gf[name], gp[name], rtol=1e-10, atol=1e-12, err_msg=name)


def test_a_table_can_be_switched_on_a_live_model_and_instrumented():
    """What bench.py does: a table whose functions count their calls, no names rebound."""
    calls = {}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)
        return wrapper

    counted = KernelTable("counted", **{n: counting(n, f) for n, f in FAST.functions().items()})
    model = GPT(GPTConfig(vocab_size=7, block_size=4, n_layer=3, n_head=1, n_embd=4), seed=0)
    model.kernels = counted
    model(np.zeros((1, 4), dtype=int), np.zeros((1, 4), dtype=int))
    model.backward()
    assert calls["attention_forward"] == calls["attention_backward"] == 3
    assert calls["layernorm_forward"] == calls["layernorm_backward"] == 2 * 3 + 1  # + ln_f
    assert calls["linear_forward"] == 4 * 3
    assert FAST.attention_forward is not counted.attention_forward  # the shared table is untouched


def test_unknown_kernel_table_is_refused_by_name():
    assert kernel_table("plain") is PLAIN and set(KERNELS) == {"plain", "fast"}
    with pytest.raises(ValueError, match="kernels must be one of plain, fast, got 'turbo'"):
        GPT(GPTConfig(vocab_size=5, block_size=4), kernels="turbo")


# ----------------------------------------------------------------------------------------
# the chunked and tiled forms (issue 15): the same numbers, a chunk or a tile at a time

from transferlab import kernels as K  # noqa: E402


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few rows, so that small test arrays are split into several (and one
    ragged last chunk): the loops are exercised, not skipped."""
    monkeypatch.setattr(K, "CHUNK_BYTES", 150)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gelu_chunked_equals_plain(dtype, small_chunks):
    r = np.random.default_rng(10)
    x = (3 * r.standard_normal((3, 7, 16))).astype(dtype)
    dout = r.standard_normal(x.shape).astype(dtype)
    assert len(K.row_chunks(21, 16 * x.itemsize)) > 2  # 21 rows, several chunks
    out, cache = K.gelu_forward_chunked(x)
    ref, ref_cache = L.gelu_forward(x)
    np.testing.assert_allclose(out, ref, rtol=TOL[dtype], atol=TOL[dtype])
    (dx,) = K.gelu_backward_chunked(dout, cache)
    (dx_ref,) = L.gelu_backward(dout, ref_cache)
    np.testing.assert_allclose(dx, dx_ref, rtol=TOL[dtype], atol=TOL[dtype])
    assert out.dtype == dx.dtype == dtype and out.shape == dx.shape == x.shape


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_chunked_gelu_keeps_only_its_input_and_equals_the_in_place_form_bit_for_bit(dtype, small_chunks):
    """The chunked GELU keeps x alone for backward (no (..., D) tanh alive in between) and
    recomputes the tanh with the forward's own operations: the in-place form's numbers,
    bit for bit, which keeps th."""
    r = np.random.default_rng(11)
    x = (3 * r.standard_normal((2, 9, 16))).astype(dtype)
    dout = r.standard_normal(x.shape).astype(dtype)
    out, cache = K.gelu_forward_chunked(x)
    assert len(cache) == 1 and cache[0] is x
    ref, ref_cache = K.gelu_forward_fast(x)
    assert len(ref_cache) == 2  # x and th
    assert np.array_equal(out, ref)
    assert np.array_equal(K.gelu_backward_chunked(dout, cache)[0], K.gelu_backward_fast(dout, ref_cache)[0])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_layernorm_chunked_equals_plain(dtype, small_chunks):
    r = np.random.default_rng(11)
    x, dout = (r.standard_normal((2, 2, 7, 16)) * 3 + 1).astype(dtype)
    w, b = r.standard_normal((2, 16)).astype(dtype)
    out, cache = K.layernorm_forward_chunked(x, w, b)
    ref, ref_cache = L.layernorm_forward(x, w, b)
    np.testing.assert_allclose(out, ref, rtol=TOL[dtype], atol=TOL[dtype])
    for got, want in zip(K.layernorm_backward_chunked(dout, cache), L.layernorm_backward(dout, ref_cache)):
        np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype])
        assert got.dtype == dtype and got.shape == want.shape


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_tiled_causal_attention_equals_plain(padded, dtype, small_chunks):
    r = np.random.default_rng(12)
    B, T, C, NH = 3, 11, 8, 2  # 11 queries in tiles of 4: a ragged last tile
    qkv = r.standard_normal((B, T, 3 * C)).astype(dtype)
    dy = r.standard_normal((B, T, C)).astype(dtype)
    pad = None
    if padded:
        pad = np.ones((B, T), dtype=bool)
        pad[0, 5:] = False
        pad[2, :] = False  # a fully padded row
    allowed = L.attention_mask(T, True, pad)
    assert K.only_past_keys(allowed)
    y, cache = K.attention_forward_tiled(qkv, NH, allowed, tile=4)
    assert isinstance(cache, K.TiledAttentionCache) and len(cache.tiles) > 3  # batch split too
    y_ref, ref_cache = L.attention_forward(qkv, NH, allowed)
    np.testing.assert_allclose(y, y_ref, rtol=TOL[dtype], atol=TOL[dtype])
    (dqkv,) = K.attention_backward_tiled(dy, cache)
    (dqkv_ref,) = L.attention_backward(dy, ref_cache)
    np.testing.assert_allclose(dqkv, dqkv_ref, rtol=TOL[dtype], atol=TOL[dtype])
    assert y.dtype == dqkv.dtype == dtype


def test_tiled_attention_with_dropout_draws_the_plain_mask():
    r = np.random.default_rng(13)
    qkv, dy = r.standard_normal((2, 9, 24)), r.standard_normal((2, 9, 8))
    allowed = L.attention_mask(9, True)
    y, cache = K.attention_forward_tiled(qkv, 2, allowed, 0.3, np.random.default_rng(9), tile=4)
    y_ref, ref_cache = L.attention_forward(qkv, 2, allowed, 0.3, np.random.default_rng(9))
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(K.attention_backward_tiled(dy, cache)[0],
                               L.attention_backward(dy, ref_cache)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal, T", [(False, 11), (True, 4)])
def test_tiled_attention_falls_back_where_tiles_cannot_skip_anything(causal, T):
    """Bidirectional attention (a query sees later keys) or T <= tile: the untiled form."""
    r = np.random.default_rng(14)
    qkv, dy = r.standard_normal((2, T, 24)), r.standard_normal((2, T, 8))
    allowed = L.attention_mask(T, causal, np.ones((2, T), dtype=bool))
    assert K.only_past_keys(allowed) == causal
    y, cache = K.attention_forward_tiled(qkv, 2, allowed, tile=4)
    assert not isinstance(cache, K.TiledAttentionCache)
    y_ref, ref_cache = L.attention_forward(qkv, 2, allowed)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(K.attention_backward_tiled(dy, cache)[0],
                               L.attention_backward(dy, ref_cache)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("smoothing, count", [(0.0, None), (0.1, None), (0.0, 40)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cross_entropy_chunked_equals_plain_bit_for_bit(smoothing, count, dtype, small_chunks):
    """The same operations in the same order, a chunk of rows at a time: equal, not close."""
    from transferlab.losses import IGNORE_INDEX, cross_entropy

    r = np.random.default_rng(15)
    logits = (4 * r.standard_normal((3, 7, 9))).astype(dtype)  # 21 rows of 9 classes
    targets = r.integers(0, 9, (3, 7))
    targets[0, :3] = IGNORE_INDEX
    targets[2, 6] = IGNORE_INDEX
    assert len(K.row_chunks(21, 9 * logits.itemsize)) > 2
    loss, dlogits = K.cross_entropy_chunked(logits, targets, label_smoothing=smoothing, count=count)
    want_loss, want = cross_entropy(logits, targets, label_smoothing=smoothing, count=count)
    assert loss == want_loss and np.array_equal(dlogits, want)
    assert dlogits.dtype == dtype and dlogits.shape == logits.shape
    assert not dlogits[0, :3].any()  # ignored positions get no gradient
    # no counted position: a zero loss and gradient, as the plain form gives
    none = np.full((3, 7), IGNORE_INDEX)
    loss0, d0 = K.cross_entropy_chunked(logits, none)
    assert loss0 == 0.0 and d0.shape == logits.shape and not d0.any()


def test_add_rows_at_equals_ufunc_at_bit_for_bit():
    """The flat-index form adds the same rows in the same order as np.add.at on rows, also
    across its chunks of rows, and refuses a target whose 1-D view would be a copy."""
    r = np.random.default_rng(15)
    C = 3  # rows of 3: a chunk is CHUNK_BYTES / 24 rows, so 25,000 rows span three chunks
    rows = r.integers(0, 7, 25_000)  # every row repeats thousands of times
    values = (r.standard_normal((25_000, C)) * 10.0 ** r.integers(-4, 4, (25_000, 1))).astype(np.float32)
    want = r.standard_normal((7, C)).astype(np.float32)
    got = want.copy()
    np.add.at(want, rows, values)
    K.add_rows_at(got, rows, values)
    assert np.array_equal(got, want)
    with pytest.raises(ValueError, match="C-contiguous"):
        K.add_rows_at(np.zeros((C, 7), np.float32).T, rows, values)


@pytest.mark.parametrize("threads", [2, 3])
def test_split_in_threads_gives_the_whole_calls_numbers_from_as_many_threads(threads, monkeypatch):
    """A copy and a left-to-right sum of three parts, each group's entries cut into shares
    (sizes that do not divide evenly, a 0-d and a transposed array): the whole calls'
    numbers bit for bit, computed in `threads` shares handed to other threads; below the
    threshold, whole calls in the calling thread."""
    import threading

    from transferlab.model import add_in_order

    r = np.random.default_rng(16)
    shapes = [(7, 5), (1001,), (), (3, 4, 5)]
    parts = [[r.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(3)]
    parts[1][3] = np.ascontiguousarray(parts[1][3].T).T  # strided: runs whole
    want = [a.copy() for a in parts[0]]
    for w, b, c in zip(want, parts[1], parts[2]):
        add_in_order(w, b, c)  # w += b; w += c
    seen, handed = set(), []
    real = K.in_threads
    monkeypatch.setattr(K, "in_threads", lambda fn, items: handed.append(len(items)) or real(fn, items))

    def add(total, *others):
        seen.add(threading.get_ident())
        add_in_order(total, *others)

    got = [a.copy() for a in parts[0]]
    K.split_in_threads(add, zip(got, parts[1], parts[2]), threads, split_from=0)
    for g, w in zip(got, want):
        assert np.array_equal(g, w)
    assert handed == [threads] and seen and threading.get_ident() not in seen
    copies = [np.empty_like(a) for a in parts[1]]
    K.split_in_threads(np.copyto, zip(copies, parts[1]), threads, split_from=0)
    for c, a in zip(copies, parts[1]):
        assert np.array_equal(c, a)
    assert handed == [threads, threads]
    seen.clear()
    K.split_in_threads(add, zip(got, parts[1], parts[2]), threads)  # 2,000 entries < SPLIT_FROM
    assert seen == {threading.get_ident()} and handed == [threads, threads]


@pytest.mark.parametrize("V", [31, 20])
@pytest.mark.parametrize("tied", [False, True])
def test_embedding_rows_equal_plain_bit_for_bit(tied, V):
    """Sums over the batch's own tokens, written into dwte or added into the tied head's
    gradient, equal np.add.at into a zero (V, C) array (plus the head's gradient): with
    fewer positions than rows (24 < 31, the (tokens, C) sums) and with more (24 >= 20,
    all V rows summed)."""
    r = np.random.default_rng(16)
    T, C = 6, 5  # 24 positions
    idx = r.integers(0, 6, (4, T))  # tokens 6..V-1 never occur; most occur several times
    dout = r.standard_normal((4, T, C)).astype(np.float32)
    cache = (idx, (V, C), (8, C))
    head = r.standard_normal((V, C)).astype(np.float32) if tied else None
    want_wte, want_wpe = L.embedding_backward(dout, cache, None if head is None else head.copy())
    got_wte, got_wpe = K.embedding_backward_rows(dout, cache, None if head is None else head.copy())
    assert np.array_equal(got_wte, want_wte) and np.array_equal(got_wpe, want_wpe)
    assert got_wte.shape == (V, C) and got_wte.dtype == np.float32
    assert np.array_equal(got_wte[6:], head[6:] if tied else np.zeros((V - 6, C)))  # absent tokens
    # the plain form's tied case is the two gradients added
    alone, _ = L.embedding_backward(dout, cache)
    if tied:
        np.testing.assert_array_equal(want_wte, alone + head)


# ----------------------------------------------------------------------------------------
# batch parts in threads (GPT(..., batch_threads=2)): the one-thread numbers


def _loss_and_grads(model, idx, y, mask=None):
    logits, loss = model(idx, y, attention_mask=mask)
    return logits, loss, model.backward()


@pytest.mark.parametrize("head, frozen, smoothing", [
    ("lm", False, 0.0), ("sequence", False, 0.1), ("score", False, 0.0), ("token", False, 0.0),
    ("lm", True, 0.0)])
def test_batch_parts_in_threads_give_the_one_thread_numbers(head, frozen, smoothing):
    """The whole step in parts (backbone, head, loss, backward): each part divides by the
    whole batch's count, so loss, logits and every gradient equal the one-thread numbers,
    also when the parts count different numbers of targets (padding, ignored positions)."""
    from transferlab import masks as M

    kind = dict(head="sequence", sequence_output="score") if head == "score" else dict(head=head)
    cfg = GPTConfig(vocab_size=11, block_size=70, n_layer=2, n_head=2, n_embd=8, dtype="float64",
                    n_classes=3, pooling="mean", label_smoothing=smoothing, **kind)
    r = np.random.default_rng(6)
    idx = r.integers(0, 11, (5, 70))  # 5 rows: parts of 2 and 3; T = 70 > a tile of 64
    if head == "lm":
        y = r.integers(0, 11, (5, 70))
        y[:2, 5:] = -100  # the first part counts far fewer positions than the second
    elif head == "token":
        y = r.integers(0, 3, (5, 70))
    else:
        y = r.random(5) if head == "score" else r.integers(0, 3, 5)
    mask = None if head == "lm" else (np.arange(70)[None, :] < np.array([70, 40, 3, 70, 66])[:, None])
    one, two = GPT(cfg, seed=2), GPT(cfg, seed=2, batch_threads=2)
    if frozen:
        M.freeze_to(one, 1), M.freeze_to(two, 1)
    l1, loss1, g1 = _loss_and_grads(one, idx, y, mask)
    l2, loss2, g2 = _loss_and_grads(two, idx, y, mask)
    np.testing.assert_allclose(l2, l1, rtol=1e-12, atol=1e-12)
    assert loss2 == pytest.approx(loss1, rel=1e-12)
    assert g2.keys() == g1.keys()
    for name in g1:
        np.testing.assert_allclose(g2[name], g1[name], rtol=1e-10, atol=1e-13, err_msg=name)
    assert _loss_and_grads(two, idx, y, mask)[1] == loss2  # run after run: the same numbers
    # without targets (evaluation) the parts give the same logits, and nothing to backward
    np.testing.assert_allclose(two(idx, attention_mask=mask)[0], l1, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="needs a forward pass with targets"):
        two.backward()


def test_batch_parts_in_float32_equal_the_one_thread_numbers_to_float32_rounding():
    cfg = GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=16)
    r = np.random.default_rng(8)
    idx, y = r.integers(0, 50, (6, 32)), r.integers(0, 50, (6, 32))
    one, two = GPT(cfg, seed=4), GPT(cfg, seed=4, batch_threads=2)
    _, loss1, g1 = _loss_and_grads(one, idx, y)
    _, loss2, g2 = _loss_and_grads(two, idx, y)
    assert loss2 == pytest.approx(loss1, rel=1e-6)
    for name in g1:
        assert g2[name].dtype == np.float32
        np.testing.assert_allclose(g2[name], g1[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_batch_threads_fall_back_to_one_thread_under_dropout_and_are_validated():
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, dropout=0.1,
                    dtype="float64")
    idx = np.random.default_rng(7).integers(0, 11, (4, 8))
    one, two = GPT(cfg, seed=3), GPT(cfg, seed=3, batch_threads=2)
    # dropout draws from one RNG: threads would reorder the draws, so the batch stays whole
    assert _loss_and_grads(one, idx, idx)[1] == _loss_and_grads(two, idx, idx)[1]
    with pytest.raises(ValueError, match="batch_threads must be a positive integer, got 0"):
        GPT(cfg, batch_threads=0)


def test_backward_releases_the_caches():
    """One forward, one backward: the activations are freed when backward is done, and a
    second backward needs a new forward."""
    model = GPT(GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=1, n_embd=4), seed=0)
    model(np.zeros((1, 4), dtype=int), np.zeros((1, 4), dtype=int))
    grads = model.backward()
    assert model._cache is None and model._backbone_cache is None
    assert set(grads) == set(model.params)
    with pytest.raises(RuntimeError, match="needs a forward pass with targets"):
        model.backward()
