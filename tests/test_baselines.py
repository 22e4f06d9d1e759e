"""Tests for transferlab.baselines: the optimum checked by brute-force enumeration on tiny
worlds, the count and chance baselines checked against numbers worked out by hand."""
import itertools
import json
import math

import numpy as np
import pytest

from transferlab.baselines import (
    baselines_for,
    bayes_ceiling,
    bayes_outputs,
    chance_baseline,
    count_baseline,
    count_chains,
    count_outputs,
    forward_backward,
    optimal_lm_loss,
    segment_paths,
    source_reference,
    topic_marginals,
)
from transferlab.losses import IGNORE_INDEX
from transferlab.tasks import (
    MIN_SEGMENT,
    SCORE_TOPIC,
    MarkovMixture,
    Split,
    TaskSpec,
    _segment_path,
    make_target,
    target_chains,
)
from transferlab.train import lm_split, metrics


def random_chains(seed, K=2, V=3):
    rng = np.random.default_rng(seed)
    return MarkovMixture(rng.dirichlet(np.ones(V), size=K), rng.dirichlet(np.full(V, 0.5), size=(K, V)))


def every_sequence(V, L, T, pad):
    """All V**L sequences of L tokens, padded to T columns, as a Split (y filled in later)."""
    body = np.array(list(itertools.product(range(V), repeat=L)), dtype=np.int64)  # (V**L, L)
    x = np.full((len(body), T), pad, dtype=np.int64)
    x[:, :L] = body
    return x, np.repeat(np.arange(T)[None, :] < L, len(x), axis=0)


def joint_prob(chains, x, path):
    """p(x, path) / p(path) by plain multiplication: x (L,) tokens, path (L,) topics."""
    p = chains.initial[path[0], x[0]]
    for t in range(1, len(x)):
        p *= chains.transitions[path[t], x[t - 1], x[t]]
    return p


# ------------------------------------------------------------------ the optimal LM loss


def test_optimal_lm_loss_matches_the_mixture_formula_term_by_term():
    """p(x_t | x_<t) = sum_k p(k | x_<t) A_k[x_{t-1}, x_t], written out without logs."""
    chains = random_chains(0)
    K, V, T = 2, 3, 4
    x, _ = every_sequence(V, T, T, pad=V)
    for row in x:
        losses = []
        for t in range(1, T):
            prefix = np.array([joint_prob(chains, row[:t], np.full(t, k)) for k in range(K)])
            post = prefix / prefix.sum()  # uniform prior cancels
            losses.append(-math.log(post @ chains.transitions[:, row[t - 1], row[t]]))
        assert optimal_lm_loss(chains, row[None], pad_id=V) == pytest.approx(np.mean(losses), abs=1e-12)


def test_optimal_lm_loss_averages_over_the_positions_the_lm_metric_counts():
    """The Bayes predictive distribution fed to train.metrics("lm", ..., lm_split(tokens))
    gives exactly optimal_lm_loss: same positions (x_1 .. x_{T-1}), same mean."""
    chains = random_chains(1, K=3, V=4)
    rng = np.random.default_rng(0)
    tokens, _ = chains.sample(rng, 50, 6)
    N, T = tokens.shape
    logits = np.empty((N, T - 1, 4))
    for n in range(N):
        for t in range(1, T):
            prefix = np.array([joint_prob(chains, tokens[n, :t], np.full(t, k)) for k in range(3)])
            logits[n, t - 1] = np.log((prefix / prefix.sum()) @ chains.transitions[:, tokens[n, t - 1]])
    expected = metrics("lm", logits, lm_split(tokens))["loss"]
    assert optimal_lm_loss(chains, tokens, pad_id=4) == pytest.approx(expected, abs=1e-12)


def test_trailing_pads_are_not_predicted():
    chains = random_chains(2)
    row = np.array([[0, 2, 1, 1, 3, 3]])  # pad_id 3
    assert optimal_lm_loss(chains, row, pad_id=3) == pytest.approx(optimal_lm_loss(chains, row[:, :4], 3))
    with pytest.raises(ValueError, match="prefix"):
        optimal_lm_loss(chains, np.array([[0, 3, 1]]), pad_id=3)


def test_optimal_lm_loss_beats_ignoring_the_context_and_loses_to_knowing_the_topic():
    spec = TaskSpec()
    loss = source_reference(spec)["optimal_lm_loss"]
    from transferlab.tasks import make_source, source_chains
    chains, source = source_chains(spec), make_source(spec)
    x, topics = source.val, source.val_topics
    known = -np.log(chains.transitions[topics[:, None], x[:, :-1], x[:, 1:]]).mean()  # oracle topic
    marginal = chains.transitions.mean(axis=0)  # the topic-averaged chain, no inference
    blind = -np.log(marginal[x[:, :-1], x[:, 1:]]).mean()
    assert known < loss < blind


# ------------------------------------------------------------------ segment paths


@pytest.mark.parametrize("kind", ["tagging", "score"])
@pytest.mark.parametrize("L", [7, 10])
def test_segment_paths_are_the_distribution_segment_path_samples(kind, L):
    """Frequencies of 200k paths from tasks._segment_path against the enumerated prior."""
    K, n = 3, 200_000
    paths, log_prior = segment_paths(L, K, kind)
    prior = np.exp(log_prior)
    assert prior.sum() == pytest.approx(1.0, abs=1e-12)
    code = paths @ K ** np.arange(L)  # a path as a base-K number
    assert len(np.unique(code)) == len(paths)  # each path listed once
    sampled = _segment_path(np.random.default_rng(0), np.full(n, L), L, K, kind) @ K ** np.arange(L)
    index = {c: i for i, c in enumerate(code)}
    assert set(np.unique(sampled)) <= set(index)  # the sampler never leaves the enumerated set
    freq = np.bincount([index[c] for c in sampled], minlength=len(paths)) / n
    sigma = np.sqrt(prior * (1 - prior) / n)
    assert np.all(np.abs(freq - prior) < 5 * sigma)


def brute_force_prior(z, kind, K):
    """Prior of a topic path from its runs, counting the cuttings by brute force."""
    L = len(z)
    runs = [(k, len(list(g))) for k, g in itertools.groupby(z)]
    n = len(runs)
    if n not in (2, 3) or min(r for _, r in runs) < MIN_SEGMENT:
        return 0.0
    p_n = {2: 0.5, 3: 0.5} if L // MIN_SEGMENT >= 3 else {2: 1.0, 3: 0.0}
    cuttings = sum(1 for parts in itertools.product(range(MIN_SEGMENT, L + 1), repeat=n) if sum(parts) == L)
    topics = [k for k, _ in runs]
    if kind == "tagging":
        p_topics = 1 / K * (1 / (K - 1)) ** (n - 1)  # runs of a path never repeat a topic
    else:
        is_score = [k == SCORE_TOPIC for k in topics]
        if any(a == b for a, b in zip(is_score, is_score[1:])):
            return 0.0
        p_topics = 0.5 * (1 / (K - 1)) ** (n - sum(is_score))
    return p_n[n] / cuttings * p_topics


@pytest.mark.parametrize("kind", ["tagging", "score"])
def test_topic_marginals_match_brute_force_over_every_path(kind):
    K, V, L, T = 3, 3, 9, 11
    chains = random_chains(3, K=K, V=V)
    all_z = np.array(list(itertools.product(range(K), repeat=L)))  # (K**L, L)
    prior = np.array([brute_force_prior(z, kind, K) for z in all_z])
    assert prior.sum() == pytest.approx(1.0)
    rng = np.random.default_rng(1)
    x = np.full((4, T), V)
    x[:, :L] = rng.integers(V, size=(4, L))
    real = np.arange(T)[None, :] < L
    got = topic_marginals(chains, kind, x, np.repeat(real, 4, axis=0))
    for n in range(4):
        joint = np.array([p * joint_prob(chains, x[n, :L], z) if p else 0.0 for z, p in zip(all_z, prior)])
        post = joint / joint.sum()
        want = np.stack([(post[:, None] * (all_z == k)).sum(axis=0) for k in range(K)], axis=1)  # (L, K)
        np.testing.assert_allclose(got[n, :L], want, atol=1e-12)
        assert np.all(got[n, L:] == 0)
        if kind == "score":  # the posterior mean of the fraction from SCORE_TOPIC
            fraction = (all_z == SCORE_TOPIC).mean(axis=1)
            assert got[n, :L, SCORE_TOPIC].mean() == pytest.approx(post @ fraction, abs=1e-12)


# ------------------------------------------------------------------ the Bayes ceiling


def expected_accuracy_by_enumeration(kind):
    """Tiny world, every sequence of length 6: the exact expected accuracy of the best
    classifier, sum_x max_c p(x, c), and the code's predictions on every x."""
    spec = TaskSpec(n_tokens=3, n_topics=4, seq_len=7, min_len=6, relatedness=0.5)
    chains = target_chains(spec)
    x, mask = every_sequence(3, 6, 7, pad=spec.pad_id)
    p_xk = np.array([[joint_prob(chains, row[:6], np.full(6, k)) / 4 for k in range(4)] for row in x])
    if kind == "binary":  # class 1 = topics 0 .. K//2 - 1
        p_xk = np.stack([p_xk[:, 2:].sum(axis=1), p_xk[:, :2].sum(axis=1)], axis=1)
    split = Split(x, np.zeros(len(x), dtype=np.int64), mask)
    pred = bayes_outputs(kind, spec, split).argmax(axis=1)
    return spec, p_xk.max(axis=1).sum(), p_xk[np.arange(len(x)), pred].sum()


@pytest.mark.parametrize("kind", ["topic", "binary"])
def test_bayes_classifier_reaches_the_enumerated_optimum(kind):
    spec, best, achieved = expected_accuracy_by_enumeration(kind)
    assert achieved == pytest.approx(best, abs=1e-12)
    # ... and its accuracy on a large sampled test split is that expectation
    big = TaskSpec(**{**spec.__dict__, "n_target_test": 20_000})
    acc = bayes_ceiling(kind, big, make_target(kind, big).test)["accuracy"]
    assert abs(acc - best) < 4 * math.sqrt(best * (1 - best) / 20_000)


def test_bayes_tagger_reaches_the_enumerated_optimum():
    """Every sequence of length 9 (only length allowed) in a 2-topic, 3-token world: the
    expected token accuracy of per-token argmax equals sum_x sum_t max_k p(x, z_t = k) / L."""
    spec = TaskSpec(n_tokens=3, n_topics=2, seq_len=10, min_len=9)
    K, L = 2, 9
    chains = target_chains(spec)
    all_z = np.array(list(itertools.product(range(K), repeat=L)))
    prior = np.array([brute_force_prior(z, "tagging", K) for z in all_z])
    paths, prior = all_z[prior > 0], prior[prior > 0]
    x, mask = every_sequence(3, L, 10, pad=spec.pad_id)
    joint = np.array([[p * joint_prob(chains, row[:L], z) for z, p in zip(paths, prior)] for row in x])  # (X, P)
    p_xtk = np.stack([joint @ (paths == k) for k in range(K)], axis=2)  # (X, L, K) p(x, z_t = k)
    best = p_xtk.max(axis=2).sum() / L
    split = Split(x, np.zeros(x.shape, dtype=np.int64), mask)
    pred = bayes_outputs("tagging", spec, split).argmax(axis=2)[:, :L]  # (X, L)
    achieved = np.take_along_axis(p_xtk, pred[:, :, None], axis=2).sum() / L
    assert achieved == pytest.approx(best, abs=1e-12)
    assert best > 0.5  # not a degenerate world


def test_bayes_ceiling_reports_the_metrics_of_each_kind():
    spec = TaskSpec(n_target_test=64)
    for kind, names in (("topic", {"accuracy"}), ("binary", {"accuracy", "auc"}),
                        ("tagging", {"accuracy"}), ("score", {"mse", "mae"})):
        assert set(bayes_ceiling(kind, spec, make_target(kind, spec).test)) == names


# ------------------------------------------------------------------ the count baseline


def toy_topic_splits():
    """Two classes over 3 tokens, PAD = 3. Class 0 saw 0 1 0, class 1 saw 2 2 1."""
    mask = np.array([[1, 1, 1, 0]] * 2, dtype=bool)
    train = Split(np.array([[0, 1, 0, 3], [2, 2, 1, 3]]), np.array([0, 1]), mask)
    eval_mask = np.array([[1, 1, 0]] * 3, dtype=bool)
    # the third label disagrees with the counts on purpose
    evaluate = Split(np.array([[2, 0, 3], [0, 2, 3], [2, 1, 3]]), np.array([1, 0, 0]), eval_mask)
    return train, evaluate


def test_count_chains_are_the_smoothed_counts_worked_out_by_hand():
    train, _ = toy_topic_splits()
    weights = np.zeros((2, 4, 2))
    weights[0, :, 0] = weights[1, :, 1] = 1.0
    chains = count_chains(train.x, train.mask, weights, n_tokens=3, alpha=0.1)
    np.testing.assert_allclose(chains.initial, [[1.1, 0.1, 0.1], [0.1, 0.1, 1.1]] / np.float64(1.3))
    np.testing.assert_allclose(chains.transitions[0], [[0.1 / 1.3, 1.1 / 1.3, 0.1 / 1.3],
                                                       [1.1 / 1.3, 0.1 / 1.3, 0.1 / 1.3],
                                                       [1 / 3, 1 / 3, 1 / 3]])
    np.testing.assert_allclose(chains.transitions[1], [[1 / 3] * 3, [1 / 3] * 3,
                                                       [0.1 / 2.3, 1.1 / 2.3, 1.1 / 2.3]])


def test_count_baseline_decides_as_worked_out_by_hand():
    train, evaluate = toy_topic_splits()
    # 2 0: class 0 (0.1/1.3)(1/3) = 0.025641 against class 1 (1.1/1.3)(0.1/2.3) = 0.036789
    # 0 2: class 0 (1.1/1.3)(0.1/1.3) = 0.065089 against class 1 (0.1/1.3)(1/3) = 0.025641
    # 2 1: class 0 (0.1/1.3)(1/3) = 0.025641 against class 1 (1.1/1.3)(1.1/2.3) = 0.404682
    p1 = np.array([0.036789 / (0.025641 + 0.036789), 0.025641 / (0.065089 + 0.025641),
                   0.404682 / (0.025641 + 0.404682)])
    out = count_outputs("topic", train, evaluate, n_tokens=3, n_classes=2)
    np.testing.assert_allclose(np.exp(out[:, 1]), p1, atol=1e-5)
    assert count_baseline("topic", train, evaluate, 3, 2) == {"accuracy": pytest.approx(2 / 3)}
    binary = count_baseline("binary", train, evaluate, 3, 2)
    assert binary["accuracy"] == pytest.approx(2 / 3)
    assert binary["auc"] == pytest.approx(0.5)  # the positive (0.589) outranks one negative of two


def test_count_score_worked_out_by_hand():
    """Train 0 0 0 (y = 1) and 1 1 1 (y = 0): SCORE_TOPIC's chain counts only the first row.
    For 0 0: token 0 has posterior 1.1/(1.1 + 0.1) = 0.91667 (first-token counts, prior 1/2),
    token 1 (2.1/2.3) / (2.1/2.3 + 1/3) = 0.73256, so the score is their mean 0.824612."""
    mask = np.ones((2, 3), dtype=bool)
    train = Split(np.array([[0, 0, 0], [1, 1, 1]]), np.array([1.0, 0.0]), mask)
    evaluate = Split(np.array([[0, 0, 3]]), np.array([0.8]), np.array([[1, 1, 0]], dtype=bool))
    assert count_outputs("score", train, evaluate, 3, 1)[0] == pytest.approx(0.824612, abs=1e-6)
    assert count_baseline("score", train, evaluate, 3, 1)["mse"] == pytest.approx(0.024612 ** 2, abs=1e-7)


def test_forward_backward_matches_brute_force_over_hidden_paths():
    rng = np.random.default_rng(4)
    K, T = 3, 5
    log_emit = np.log(rng.random((2, T, K)))
    start = rng.dirichlet(np.ones(K))
    switch = rng.dirichlet(np.ones(K), size=K)
    got = forward_backward(log_emit, np.log(start), np.log(switch))
    for n in range(2):
        want = np.zeros((T, K))
        for z in itertools.product(range(K), repeat=T):
            p = start[z[0]] * np.prod([switch[a, b] for a, b in zip(z, z[1:])])
            p *= np.exp(sum(log_emit[n, t, k] for t, k in enumerate(z)))
            want[np.arange(T), z] += p
        np.testing.assert_allclose(np.exp(got[n]), want / want.sum(axis=1, keepdims=True), atol=1e-12)


def test_count_tagger_ignores_padding():
    """Appending pads (and PAD-valued tags marked IGNORE) to every row changes nothing."""
    spec = TaskSpec(n_target_test=32)
    data = make_target("tagging", spec)
    base = count_outputs("tagging", data.train, data.test, spec.n_tokens, spec.n_topics)

    def widen(s):
        pad = np.full((len(s), 3), spec.pad_id)
        return Split(np.hstack([s.x, pad]), np.hstack([s.y, np.full((len(s), 3), IGNORE_INDEX)]),
                     np.hstack([s.mask, np.zeros((len(s), 3), bool)]))

    wide = count_outputs("tagging", widen(data.train), widen(data.test), spec.n_tokens, spec.n_topics)
    real = data.test.mask
    np.testing.assert_allclose(wide[:, : spec.seq_len][real], base[real], atol=1e-10)


# ------------------------------------------------------------------ chance


def test_chance_is_the_training_majority_or_mean():
    mask = np.ones((4, 2), dtype=bool)
    x = np.zeros((4, 2), dtype=np.int64)
    train, test = Split(x, np.array([2, 2, 1, 0]), mask), Split(x, np.array([2, 0, 2, 1]), mask)
    assert chance_baseline("topic", train, test) == {"accuracy": 0.5}
    binary = chance_baseline("binary", Split(x, np.array([1, 0, 0, 0]), mask), Split(x, np.array([0, 1, 0, 1]), mask))
    assert binary == {"accuracy": 0.5, "auc": 0.5}
    tags = np.array([[1, 1], [1, IGNORE_INDEX], [0, IGNORE_INDEX], [0, IGNORE_INDEX]])  # 3 ones, 2 zeros
    test_tags = np.array([[1, 0], [0, 0], [1, IGNORE_INDEX], [0, IGNORE_INDEX]])  # 2 of 6 are 1
    assert chance_baseline("tagging", Split(x, tags, mask), Split(x, test_tags, mask)) == {"accuracy": pytest.approx(2 / 6)}
    score = chance_baseline("score", Split(x, np.array([0.2, 0.4, 0.6, 0.8]), mask), Split(x, np.array([0.5, 0.3, 0.5, 0.7]), mask))
    assert score["mse"] == pytest.approx((0 + 0.04 + 0 + 0.04) / 4) and score["mae"] == pytest.approx(0.1)


# ------------------------------------------------------------------ together


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("concentration", [0.1, 1.0])
def test_ceiling_is_at_least_the_count_baseline_and_chance(seed, concentration):
    spec = TaskSpec(concentration=concentration)
    for kind in ("topic", "tagging"):
        entries = {e["name"]: e["target"]["accuracy"] for e in baselines_for(kind, spec, make_target(kind, spec, seed), seed)}
        assert entries["bayes"] >= entries["count"] > entries["chance"]


def test_baselines_for_gives_json_ready_entries():
    spec = TaskSpec(relatedness=0.5, n_target_test=64)
    entries = baselines_for("binary", spec, make_target("binary", spec, seed=3), seed=3)
    assert [e["name"] for e in entries] == ["chance", "count", "bayes"]
    for e in entries:
        assert e["task"] == "binary" and e["seed"] == 3 and e["relatedness"] == 0.5
        assert set(e["target"]) == {"accuracy", "auc"}
    json.dumps(entries, allow_nan=False)
