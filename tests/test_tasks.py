"""Tests for transferlab.tasks: the synthetic Markov-mixture source and target tasks."""
import math
import time
from dataclasses import replace

import numpy as np
import pytest

from transferlab.losses import IGNORE_INDEX
from transferlab.tasks import (
    MAX_SEGMENTS,
    MIN_SEGMENT,
    SCORE_TOPIC,
    SMOOTHING,
    TARGET_KINDS,
    MarkovMixture,
    Split,
    TaskSpec,
    append_cls,
    bayes_accuracy,
    fresh_chains,
    make_source,
    make_target,
    source_chains,
    target_chains,
)

# The task these tests were written against: longer sequences, peakier chains and a smaller
# source set than the shipped task (TaskSpec()), so each statistic below is sharp and quick.
SPEC = TaskSpec(seq_len=32, concentration=0.1, n_source_train=2000, n_target_train=64, min_len=8)


@pytest.fixture(scope="module")
def targets():
    return {kind: make_target(kind, SPEC) for kind in TARGET_KINDS}


def transition_counts(x, path, mask, n_topics, n_tokens):
    """Slow-but-obvious counts: first tokens per topic (K, V) and transitions (K, V, V), each
    transition x[t-1] -> x[t] filed under the topic path[t] that generated x[t]."""
    first = np.zeros((n_topics, n_tokens))
    trans = np.zeros((n_topics, n_tokens, n_tokens))
    np.add.at(first, (path[:, 0], x[:, 0]), 1)
    both = mask[:, 1:] & mask[:, :-1]
    np.add.at(trans, (path[:, 1:][both], x[:, :-1][both], x[:, 1:][both]), 1)
    return first, trans


def assert_frequencies_match(counts, probs, min_count=200):
    """Every row seen at least min_count times: empirical frequencies within 5 standard errors,
    plus 4 counts of slack for the many near-zero cells (where one rare hit is no evidence)."""
    n = counts.sum(axis=-1, keepdims=True)  # (..., 1)
    seen = n[..., 0] >= min_count
    assert seen.sum() > 0.5 * seen.size, "too few rows observed to test anything"
    freq = counts[seen] / n[seen]
    p = probs[seen]
    tol = 5 * np.sqrt(p * (1 - p) / n[seen]) + 4 / n[seen]
    worst = np.max(np.abs(freq - p) - tol)
    assert worst <= 0, f"empirical frequencies off by {worst:.4f} beyond tolerance"


# ----------------------------------------------------------------------------------------
# the specification


@pytest.mark.parametrize(
    "field, value",
    [
        ("n_tokens", 1),
        ("n_tokens", 2.5),
        ("n_topics", 1),
        ("n_topics", True),
        ("seq_len", 2 * MIN_SEGMENT),
        ("concentration", 0.0),
        ("concentration", float("nan")),
        ("relatedness", 1.5),
        ("relatedness", -0.1),
        ("n_source_train", 0),
        ("n_source_val", 0),
        ("n_target_train", 0),
        ("n_target_val", -3),
        ("n_target_test", 0),
        ("min_len", TaskSpec().seq_len),  # leaves no slot for CLS
        ("min_len", 2 * MIN_SEGMENT - 1),  # too short for a topic switch
        ("seed", -1),
    ],
)
def test_bad_spec_value_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"TaskSpec\.{field} must be"):
        TaskSpec(**{field: value})


def test_spec_edge_values_are_accepted():
    shortest = 2 * MIN_SEGMENT
    TaskSpec(relatedness=0.0, min_len=shortest, seq_len=shortest + 1, n_topics=2, n_tokens=2)
    TaskSpec(relatedness=1.0, min_len=TaskSpec().seq_len - 1, concentration=1e-3)


def test_unknown_kind_lists_the_kinds():
    with pytest.raises(ValueError) as err:
        make_target("regression", SPEC)
    for kind in TARGET_KINDS:
        assert kind in str(err.value)


# ----------------------------------------------------------------------------------------
# shapes, dtypes, padding


def test_source_shapes_and_tokens():
    data = make_source(SPEC)
    assert data.train.shape == (SPEC.n_source_train, SPEC.seq_len)
    assert data.val.shape == (SPEC.n_source_val, SPEC.seq_len)
    assert data.train.dtype == np.int64 and data.val.dtype == np.int64
    assert data.vocab_size == SPEC.n_tokens + 1 and data.pad_id == SPEC.n_tokens
    # full-length sequences: chain tokens only, no PAD
    for arr in (data.train, data.val):
        assert arr.min() >= 0 and arr.max() < SPEC.n_tokens
    assert set(np.unique(data.train_topics)) == set(range(SPEC.n_topics))


@pytest.mark.parametrize("kind", TARGET_KINDS)
def test_target_shapes_dtypes_and_padding(targets, kind):
    data = targets[kind]
    T, K, pad = SPEC.seq_len, SPEC.n_topics, SPEC.n_tokens
    assert data.kind == kind and data.vocab_size == pad + 1 and data.pad_id == pad
    assert data.n_classes == {"topic": K, "binary": 2, "tagging": K, "score": 1}[kind]
    sizes = (SPEC.n_target_train, SPEC.n_target_val, SPEC.n_target_test)
    for split, n in zip((data.train, data.val, data.test), sizes):
        assert len(split) == n
        assert split.x.shape == (n, T) and split.x.dtype == np.int64
        assert split.mask.shape == (n, T) and split.mask.dtype == bool
        lengths = split.mask.sum(axis=1)
        assert lengths.min() >= SPEC.min_len and lengths.max() <= T - 1  # a CLS slot stays free
        # the mask is a prefix, and PAD sits exactly where the mask is False
        assert np.array_equal(split.mask, np.arange(T) < lengths[:, None])
        assert np.all((split.x == pad) == ~split.mask)
        assert split.x[split.mask].min() >= 0 and split.x[split.mask].max() < pad
        if kind in ("topic", "binary"):
            assert split.y.shape == (n,) and split.y.dtype == np.int64
            assert split.y.min() >= 0 and split.y.max() < data.n_classes
        elif kind == "tagging":
            assert split.y.shape == (n, T) and split.y.dtype == np.int64
        else:
            assert split.y.shape == (n,) and split.y.dtype == np.float64
            assert split.y.min() >= 0.0 and split.y.max() <= 1.0
    # lengths really vary
    assert len(np.unique(data.test.mask.sum(axis=1))) > 10


def test_sequence_labels_follow_the_generating_topic(targets):
    K = SPEC.n_topics
    for kind in ("topic", "binary"):
        split = targets[kind].test
        # one topic per row
        first = split.topics[:, :1]
        assert np.all((split.topics == first) | ~split.mask)
        expected = first[:, 0] if kind == "topic" else (first[:, 0] < K // 2).astype(np.int64)
        assert np.array_equal(split.y, expected)
        # every class is present in the test set
        assert len(np.unique(split.y)) == targets[kind].n_classes


def test_tagging_tags_are_ignore_exactly_on_pads_and_switch(targets):
    split = targets["tagging"].test
    K = SPEC.n_topics
    assert np.all((split.y == IGNORE_INDEX) == ~split.mask)
    assert split.y[split.mask].min() >= 0 and split.y[split.mask].max() < K
    assert np.array_equal(split.y, split.topics)
    n_switches = []
    for tags, length in zip(split.y, split.mask.sum(axis=1)):
        tags = tags[:length]
        changes = np.flatnonzero(tags[1:] != tags[:-1]) + 1  # segment starts after the first
        bounds = np.concatenate([[0], changes, [length]])
        assert np.diff(bounds).min() >= MIN_SEGMENT
        n_switches.append(len(changes))
    assert min(n_switches) >= 1 and max(n_switches) <= MAX_SEGMENTS - 1
    assert len(set(n_switches)) == MAX_SEGMENTS - 1  # both one and two switches occur


def test_score_is_the_fraction_of_score_topic_tokens(targets):
    split = targets["score"].test
    lengths = split.mask.sum(axis=1)
    fraction = np.array([np.mean(t[:n] == SCORE_TOPIC) for t, n in zip(split.topics, lengths)])
    np.testing.assert_allclose(split.y, fraction, rtol=0, atol=1e-12)
    assert np.all((split.topics == IGNORE_INDEX) == ~split.mask)
    assert split.y.min() > 0 and split.y.max() < 1  # every row mixes topics
    assert split.y.std() > 0.15  # scores are spread out, not bunched


@pytest.mark.parametrize("kind", ["tagging", "score"])
def test_switching_sequences_are_generated_by_their_tagged_topics(kind):
    """The per-token topics really generated the tokens: counts filed under the tagged topic
    match that topic's chain (at a switch the new chain continues from the previous token)."""
    spec = replace(SPEC, n_target_test=6000)
    split = make_target(kind, spec).test
    chains = target_chains(spec)
    path = np.maximum(split.topics, 0)  # pads are masked out anyway
    first, trans = transition_counts(split.x, path, split.mask, spec.n_topics, spec.n_tokens)
    assert_frequencies_match(trans, chains.transitions)
    assert_frequencies_match(first, chains.initial, min_count=400)


@pytest.mark.parametrize("kind", ["tagging", "score"])
def test_a_switch_continues_with_the_new_topics_chain(kind):
    """The token that opens a segment is drawn from the new topic's row of the previous token:
    those transitions are likely under the new chain and unlikely under the old one."""
    split = make_target(kind, replace(SPEC, n_target_test=2000)).test
    chains = target_chains(SPEC)
    log_a = np.log(chains.transitions)  # (K, V, V)
    row, t = np.nonzero((split.topics[:, 1:] != split.topics[:, :-1]) & split.mask[:, 1:])
    t = t + 1  # position of the first token of the new segment
    prev, tok = split.x[row, t - 1], split.x[row, t]
    new = log_a[split.topics[row, t], prev, tok].mean()
    old = log_a[split.topics[row, t - 1], prev, tok].mean()
    assert len(row) > 1000
    assert new > old + 3  # nats per switch


def test_split_batch_takes_rows():
    split = make_target("tagging", SPEC).val
    idx = np.array([5, 0, 7])
    sub = split.batch(idx)
    assert len(sub) == 3
    for name in ("x", "y", "mask", "topics"):
        assert np.array_equal(getattr(sub, name), getattr(split, name)[idx])


# ----------------------------------------------------------------------------------------
# sampling


def test_empirical_transitions_match_the_chains():
    chains = source_chains(SPEC)
    tokens, topics = chains.sample(np.random.default_rng(123), 20000, SPEC.seq_len)
    path = np.repeat(topics[:, None], SPEC.seq_len, axis=1)
    everywhere = np.ones(tokens.shape, bool)
    first, trans = transition_counts(tokens, path, everywhere, SPEC.n_topics, SPEC.n_tokens)
    assert_frequencies_match(trans, chains.transitions)
    assert_frequencies_match(first, chains.initial)
    # topics are drawn uniformly
    assert np.abs(np.bincount(topics) / len(topics) - 1 / SPEC.n_topics).max() < 0.02


def test_sampling_follows_deterministic_chains_exactly():
    """Inverse-CDF edge cases: one-hot rows must be followed, zero-probability tokens never drawn."""
    V, K = 5, 2
    initial = np.zeros((K, V))
    initial[0, 0] = initial[1, V - 1] = 1.0  # topic 0 starts at 0, topic 1 at V-1
    trans = np.zeros((K, V, V))
    trans[0, np.arange(V), (np.arange(V) + 1) % V] = 1.0  # topic 0 counts up
    trans[1, np.arange(V), (np.arange(V) - 1) % V] = 1.0  # topic 1 counts down
    chains = MarkovMixture(initial, trans)
    tokens, topics = chains.sample(np.random.default_rng(0), 50, 12, topics=np.arange(50) % K)
    up = np.arange(12) % V
    down = (V - 1 - np.arange(12)) % V
    assert np.array_equal(tokens[topics == 0], np.tile(up, (25, 1)))
    assert np.array_equal(tokens[topics == 1], np.tile(down, (25, 1)))


def test_chains_are_stochastic_and_distinctive():
    chains = source_chains(SPEC)
    np.testing.assert_allclose(chains.transitions.sum(-1), 1.0, atol=1e-12)
    np.testing.assert_allclose(chains.initial.sum(-1), 1.0, atol=1e-12)
    # smoothing: no transition is (nearly) impossible, so one surprising token costs an LM at
    # most -log(SMOOTHING / V) ~ 10 nats, never an infinite or overflowing loss
    floor = SMOOTHING / SPEC.n_tokens * (1 - 1e-9)
    assert floor > 1e-5
    assert chains.transitions.min() >= floor and chains.initial.min() >= floor
    # sparse rows: on average the 3 most likely next tokens carry most of the mass
    top3 = np.sort(chains.transitions, axis=-1)[..., -3:].sum(-1)
    assert top3.mean() > 0.7
    # and more concentration flattens them
    flat = source_chains(replace(SPEC, concentration=10.0))
    assert np.sort(flat.transitions, axis=-1)[..., -3:].sum(-1).mean() < 0.4


def test_log_likelihood_matches_a_loop():
    chains = source_chains(SPEC)
    split = make_target("topic", SPEC).val
    got = chains.log_likelihood(split.x, split.mask)
    assert got.shape == (len(split), SPEC.n_topics)
    for i in range(0, len(split), 17):
        seq = split.x[i][split.mask[i]]
        for k in range(SPEC.n_topics):
            ref = math.log(chains.initial[k, seq[0]])
            for a, b in zip(seq[:-1], seq[1:]):
                ref += math.log(chains.transitions[k, a, b])
            assert abs(got[i, k] - ref) < 1e-9
    post = chains.posterior(split.x, split.mask)
    np.testing.assert_allclose(post.sum(axis=1), 1.0)
    assert np.array_equal(post.argmax(axis=1), got.argmax(axis=1))


def test_log_likelihood_refuses_unmasked_pad():
    split = make_target("topic", SPEC).val
    with pytest.raises(ValueError, match="mask out PAD"):
        source_chains(SPEC).log_likelihood(split.x)


# ----------------------------------------------------------------------------------------
# seeds and reproducibility


@pytest.mark.parametrize("kind", TARGET_KINDS)
def test_targets_are_reproducible(kind):
    a, b = make_target(kind, SPEC), make_target(kind, SPEC)
    for name in ("train", "val", "test"):
        sa, sb = getattr(a, name), getattr(b, name)
        for field in ("x", "y", "mask", "topics"):
            assert np.array_equal(getattr(sa, field), getattr(sb, field))
    other = make_target(kind, SPEC, seed=1)
    assert not np.array_equal(other.train.x, a.train.x)


def test_source_is_reproducible_and_seeded():
    a, b = make_source(SPEC), make_source(SPEC)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert not np.array_equal(make_source(SPEC, seed=1).train, a.train)
    assert not np.array_equal(a.train[: SPEC.n_source_val], a.val)  # splits are different draws


def test_sampling_seed_keeps_the_world():
    """A new sampling seed draws new sequences from the same chains; a new spec.seed is a new
    world."""
    world = source_chains(SPEC)
    other_world = source_chains(replace(SPEC, seed=1))
    assert not np.allclose(world.transitions, other_world.transitions)
    data = make_source(SPEC, seed=7)
    fits_own = world.log_likelihood(data.val).max(axis=1).mean()
    fits_other = other_world.log_likelihood(data.val).max(axis=1).mean()
    assert fits_own > fits_other + 10  # nats per sequence: clearly the spec's world
    # and the topics the sampler reports are the ones the spec's chains recognise
    assert np.mean(world.log_likelihood(data.val).argmax(axis=1) == data.val_topics) > 0.99


def test_splits_have_their_own_streams():
    """Changing the training-set size leaves validation and test sets unchanged."""
    small = make_target("topic", SPEC)
    big = make_target("topic", replace(SPEC, n_target_train=500))
    assert np.array_equal(small.test.x, big.test.x) and np.array_equal(small.val.y, big.val.y)
    assert len(big.train) == 500
    # and the splits are independent draws: no shared lengths, no sequence leaks into test
    n = SPEC.n_target_train
    assert not np.array_equal(small.train.mask, small.test.mask[:n])
    assert not (small.train.x[:, None, :] == small.test.x[None, :, :]).all(axis=-1).any()


def test_generation_is_fast():
    start = time.perf_counter()
    make_source(SPEC)
    for kind in TARGET_KINDS:
        make_target(kind, SPEC)
    assert time.perf_counter() - start < 1.0


# ----------------------------------------------------------------------------------------
# relatedness


def test_relatedness_one_is_the_source_and_zero_is_fresh():
    src = source_chains(SPEC)
    same = target_chains(replace(SPEC, relatedness=1.0))
    assert np.array_equal(same.transitions, src.transitions)
    assert np.array_equal(same.initial, src.initial)
    fresh = target_chains(replace(SPEC, relatedness=0.0))
    assert np.array_equal(fresh.transitions, fresh_chains(SPEC).transitions)
    assert np.abs(fresh.transitions - src.transitions).max() > 0.5


def test_intermediate_relatedness_is_the_convex_mix():
    r = 0.3
    mixed = target_chains(replace(SPEC, relatedness=r))
    one = target_chains(replace(SPEC, relatedness=1.0))
    zero = target_chains(replace(SPEC, relatedness=0.0))
    expected = r * one.transitions + (1 - r) * zero.transitions
    np.testing.assert_allclose(mixed.transitions, expected, atol=1e-15)
    np.testing.assert_allclose(mixed.initial, r * one.initial + (1 - r) * zero.initial, atol=1e-15)
    np.testing.assert_allclose(mixed.transitions.sum(-1), 1.0, atol=1e-12)


def test_source_topics_only_help_when_related():
    """Classify target sequences with the *source* chains: near the ceiling at relatedness 1,
    near chance at 0. This is the transfer effect in its purest form."""
    acc = {}
    for r in (1.0, 0.0):
        spec = replace(SPEC, relatedness=r)
        test = make_target("topic", spec).test
        pred = source_chains(spec).log_likelihood(test.x, test.mask).argmax(axis=1)
        acc[r] = np.mean(pred == test.y)
    assert acc[1.0] > 0.95
    assert acc[0.0] < 0.5


def test_relatedness_does_not_change_the_draws():
    """Same lengths and labels at every relatedness: a sweep compares like with like."""
    a = make_target("tagging", replace(SPEC, relatedness=1.0)).test
    b = make_target("tagging", replace(SPEC, relatedness=0.2)).test
    assert np.array_equal(a.mask, b.mask) and np.array_equal(a.y, b.y)
    assert not np.array_equal(a.x, b.x)


# ----------------------------------------------------------------------------------------
# the Bayes ceiling


@pytest.mark.parametrize("kind", ["topic", "binary"])
def test_bayes_classifier_identifies_topics(targets, kind):
    assert bayes_accuracy(kind, SPEC, targets[kind].test) > 0.9


def test_bayes_ceiling_drops_when_topics_blur():
    """High concentration (flat rows) and short sequences make topics hard to tell apart."""
    spec = replace(SPEC, concentration=10.0, seq_len=12, min_len=6)
    assert bayes_accuracy("topic", spec, make_target("topic", spec).test) < 0.8


def test_one_token_is_not_enough():
    chains = source_chains(SPEC)
    tokens, topics = chains.sample(np.random.default_rng(5), 4000, 1)
    one = np.mean(chains.log_likelihood(tokens).argmax(axis=1) == topics)
    tokens, topics = chains.sample(np.random.default_rng(5), 4000, 6)
    six = np.mean(chains.log_likelihood(tokens).argmax(axis=1) == topics)
    assert one < 0.6 and six > 0.95


def test_bayes_accuracy_only_for_sequence_classes(targets):
    with pytest.raises(ValueError, match="topic"):
        bayes_accuracy("tagging", SPEC, targets["tagging"].test)


# ----------------------------------------------------------------------------------------
# CLS


@pytest.mark.parametrize("kind", TARGET_KINDS)
def test_append_cls_writes_after_the_last_real_token(targets, kind):
    split = targets[kind].train
    cls_id = SPEC.n_tokens + 1
    before = split.x.copy()
    out = append_cls(split, cls_id)
    lengths = split.mask.sum(axis=1)
    rows = np.arange(len(split))
    assert np.all(out.x[rows, lengths] == cls_id)
    assert np.all(out.mask[rows, lengths])
    assert np.array_equal(out.mask.sum(axis=1), lengths + 1)
    # nothing else moved, and the input is untouched
    other = np.ones_like(split.mask)
    other[rows, lengths] = False
    assert np.array_equal(out.x[other], split.x[other])
    assert np.array_equal(out.mask[other], split.mask[other])
    assert np.array_equal(split.x, before)
    assert np.array_equal(out.y, split.y)
    if kind == "tagging":
        assert np.all(out.y[rows, lengths] == IGNORE_INDEX)  # CLS carries no tag
    if kind in ("topic", "binary"):  # the ceiling ignores CLS
        assert bayes_accuracy(kind, SPEC, out) == bayes_accuracy(kind, SPEC, split)


def test_append_cls_needs_a_free_slot():
    x = np.zeros((2, 4), np.int64)
    mask = np.array([[True, True, False, False], [True, True, True, True]])
    with pytest.raises(ValueError, match="row 1"):
        append_cls(Split(x, np.zeros(2, np.int64), mask), 9)


# ----------------------------------------------------------------------------------------
# refusals with a reason


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="seed"):
        make_source(SPEC, seed=-1)
    with pytest.raises(ValueError, match="seed"):
        make_target("topic", SPEC, seed=1.5)
    with pytest.raises(ValueError, match="probability distributions"):
        MarkovMixture(np.full((2, 3), 0.5), np.full((2, 3, 3), 1 / 3))  # initial rows sum to 1.5
    with pytest.raises(ValueError, match="shape"):
        MarkovMixture(np.full((2, 3), 1 / 3), np.full((2, 3, 4), 1 / 4))
    with pytest.raises(ValueError, match="topics must have shape"):
        source_chains(SPEC).sample(np.random.default_rng(0), 4, 5, topics=np.zeros(3, int))
    with pytest.raises(ValueError, match="Split needs"):
        Split(np.zeros((3, 4), np.int64), np.zeros(2, np.int64), np.ones((3, 4), bool))
    holes = np.array([[True, False, True, False]])  # not a prefix: where would CLS go?
    with pytest.raises(ValueError, match="prefix"):
        append_cls(Split(np.zeros((1, 4), np.int64), np.zeros(1, np.int64), holes), 9)
