"""The references a transfer result is judged against: chance, a count model, and the optimum.

The synthetic chains are known (tasks.py), so the best possible prediction is computable:

- `optimal_lm_loss`:  the Bayes-optimal next-token cross-entropy on source sequences;
- `bayes_ceiling`:    the Bayes-optimal predictions of a target split, scored with the same
                      metrics a model gets (train.metrics);
- `count_baseline`:   smoothed bigram counts fitted on the labelled training split only,
                      the simplest thing that could work;
- `chance_baseline`:  the majority class (or the mean score) of the training split.

`baselines_for` and `source_reference` package them for results JSON. See docs/baselines.md.
"""
from __future__ import annotations

import itertools
import math
from functools import lru_cache

import numpy as np

from .losses import IGNORE_INDEX
from .tasks import (
    MAX_SEGMENTS,
    MIN_SEGMENT,
    SCORE_TOPIC,
    MarkovMixture,
    Split,
    TaskSpec,
    TargetData,
    make_source,
    source_chains,
    target_chains,
)
from .train import metrics

# A hand-made chain may hold exact zeros. Their log is replaced by this large negative
# number instead of -inf, because the path sums below are matrix products and -inf * 0 is
# NaN, while -1e30 * 0 is 0. exp(-1e30 - max) is still exactly 0.
LOG_ZERO = -1e30


def _log(p):
    with np.errstate(divide="ignore"):
        return np.maximum(np.log(p), LOG_ZERO)


def _logsumexp(a, axis):
    """log sum exp(a) along `axis`, with the max taken out first so nothing overflows."""
    m = a.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def _token_log_probs(chains: MarkovMixture, x, real):
    """log p(x_t | x_{t-1}, topic k) for every token and topic: x, real (N, T) -> (N, T, K).

    t = 0 uses the first-token distribution, t >= 1 the transition row of the previous token
    (at a topic switch too: the new chain continues from the previous token). Entries where
    `real` is False are 0 (log 1), so they add nothing to any sum."""
    x = np.where(real, x, 0)  # (N, T) pads point at a real row; their terms are zeroed below
    log_init = _log(chains.initial)  # (K, V)
    log_trans = _log(chains.transitions)  # (K, V, V)
    first = log_init[:, x[:, 0]].T[:, None, :]  # (N, 1, K)
    steps = log_trans[:, x[:, :-1], x[:, 1:]].transpose(1, 2, 0)  # (N, T-1, K)
    terms = np.concatenate([first, steps], axis=1)  # (N, T, K)
    return np.where(real[:, :, None], terms, 0.0)


def _real_tokens(x, mask, n_tokens):
    """Chain tokens only: the mask, minus PAD and CLS (ids >= n_tokens)."""
    real = np.asarray(mask, dtype=bool) & (np.asarray(x) < n_tokens)  # (N, T)
    T = real.shape[1]
    lengths = real.sum(axis=1)  # (N,)
    if not np.array_equal(real, np.arange(T)[None, :] < lengths[:, None]):
        raise ValueError("each row's real tokens must be a prefix (tokens, then PAD/CLS)")
    return real


# ----------------------------------------------------------------------------------------
# the source: optimal next-token loss


def optimal_lm_loss(chains: MarkovMixture, tokens, pad_id) -> float:
    """The Bayes-optimal next-token cross-entropy (nats) on source sequences `tokens` (N, T).

        p(x_t | x_<t) = sum_k p(k | x_<t) A_k[x_{t-1}, x_t],   p(k | x_<t) ∝ p(x_<t | k)

    which telescopes: with m_t = log (1/K) sum_k p(x_0..x_t | k) (the log mixture
    probability of the prefix), log p(x_t | x_<t) = m_t - m_{t-1}.

    Averaged over the positions the model's LM loss averages over: train.lm_split predicts
    x_1 .. x_{T-1} from the tokens before them (never x_0, which nothing precedes), every
    one counted. Targets equal to `pad_id` are skipped (source data has none; pads must
    trail). See docs/baselines.md#the-optimal-source-lm-loss.
    """
    tokens = np.asarray(tokens)
    real = tokens != pad_id  # (N, T)
    if np.any(tokens[real] < 0) or np.any(tokens[real] >= chains.n_tokens):
        raise ValueError(f"tokens must be chain tokens 0..{chains.n_tokens - 1} or pad_id {pad_id}")
    real = _real_tokens(tokens, real, chains.n_tokens)
    terms = _token_log_probs(chains, tokens, real)  # (N, T, K)
    prefix = np.cumsum(terms, axis=1)  # (N, T, K) log p(x_0..x_t | k)
    m = _logsumexp(prefix, axis=2) - math.log(chains.n_topics)  # (N, T) log p(x_0..x_t)
    log_p_next = np.diff(m, axis=1)  # (N, T-1) log p(x_t | x_<t), t = 1 .. T-1
    counted = real[:, 1:]  # (N, T-1) a real target (its context is then real too)
    if not counted.any():
        raise ValueError("no position to predict: every row has fewer than 2 real tokens")
    return float(-log_p_next[counted].mean())


# ----------------------------------------------------------------------------------------
# the Bayes ceiling of the targets


def _segment_count_probs(L):
    """p(number of segments = n) for a row of L real tokens, as tasks._segment_path draws it:
    n = min(d, L // MIN_SEGMENT) with d uniform in 2 .. MAX_SEGMENTS."""
    draws = [min(d, L // MIN_SEGMENT) for d in range(2, MAX_SEGMENTS + 1)]
    return {n: draws.count(n) / len(draws) for n in sorted(set(draws))}


def _segment_topic_probs(n, K, kind):
    """Every topic tuple (one topic per segment) with its prior probability: (Q, n), (Q,).

    tagging: the first topic is uniform, each next one uniform among the K-1 others.
    score:   SCORE_TOPIC and other topics alternate, starting with either (1/2 each); each
             "other" segment is uniform among the K-1 topics that are not SCORE_TOPIC."""
    tuples, probs = [], []
    for topics in itertools.product(range(K), repeat=n):
        if kind == "tagging":
            ok = all(a != b for a, b in zip(topics, topics[1:]))
            p = 1.0 / K * (1.0 / (K - 1)) ** (n - 1)
        else:
            is_score = [k == SCORE_TOPIC for k in topics]
            ok = all(a != b for a, b in zip(is_score, is_score[1:]))
            p = 0.5 * (1.0 / (K - 1)) ** (n - sum(is_score))
        if ok:
            tuples.append(topics)
            probs.append(p)
    return np.array(tuples, dtype=np.int64), np.array(probs)


@lru_cache(maxsize=None)
def segment_paths(L: int, K: int, kind: str):
    """Every topic path a tagging/score row of L real tokens can have, and its log prior.

    Returns paths (P, L) int64 and log_prior (P,), exactly the distribution that
    tasks._segment_path samples from for a row of length L:

        p(path) = p(n segments) * 1 / C(L - n (MIN_SEGMENT - 1) - 1, n - 1) * p(topics)

    The middle factor: the cuts are n - 1 distinct points, uniform in 1 .. short - 1 of the
    row shortened by MIN_SEGMENT - 1 tokens per segment ("stars and bars"), each cut j
    then moved right by j (MIN_SEGMENT - 1). See docs/baselines.md#tagging-and-score."""
    if kind not in ("tagging", "score"):
        raise ValueError(f"segment paths exist for 'tagging' and 'score', got {kind!r}")
    pos = np.arange(L)  # (L,)
    all_paths, all_log_prior = [], []
    for n, p_n in _segment_count_probs(L).items():
        short = L - n * (MIN_SEGMENT - 1)
        cuts = np.array(list(itertools.combinations(range(1, short), n - 1)), dtype=np.int64)
        cuts = cuts.reshape(-1, n - 1) + (MIN_SEGMENT - 1) * np.arange(1, n)  # (C, n-1)
        segment = (pos[None, :, None] >= cuts[:, None, :]).sum(axis=-1)  # (C, L) segment index
        topics, p_topics = _segment_topic_probs(n, K, kind)  # (Q, n), (Q,)
        paths = topics[:, segment]  # (Q, C, L)
        log_prior = math.log(p_n / len(cuts)) + np.log(p_topics)[:, None] + np.zeros(len(cuts))  # (Q, C)
        all_paths.append(paths.reshape(-1, L))
        all_log_prior.append(log_prior.reshape(-1))
    return np.concatenate(all_paths), np.concatenate(all_log_prior)


def topic_marginals(chains: MarkovMixture, kind: str, x, real):
    """p(z_t = k | x) for every real token of tagging/score rows: (N, T, K), 0 on pads.

    Exact: for each row length L, every segment path z of `segment_paths` gets

        log p(z | x) = log p(z) + sum_t log p(x_t | x_{t-1}, z_t) - log p(x)

    and the marginal of position t is the posterior mass of the paths with z_t = k. Both
    sums are matrix products with the one-hot paths H (P, L*K): the path log-likelihoods are
    E @ H.T for the token log-probabilities E (n, L*K), and the marginals are w @ H for the
    path posteriors w (n, P)."""
    N, T = x.shape
    K = chains.n_topics
    terms = _token_log_probs(chains, x, real)  # (N, T, K)
    lengths = real.sum(axis=1)  # (N,)
    marginals = np.zeros((N, T, K))  # (N, T, K)
    for L in np.unique(lengths):
        rows = np.flatnonzero(lengths == L)
        paths, log_prior = segment_paths(int(L), K, kind)  # (P, L), (P,)
        onehot = (paths[:, :, None] == np.arange(K)).reshape(len(paths), L * K).astype(np.float64)
        E = terms[rows, :L].reshape(len(rows), L * K)  # (n, L*K)
        log_joint = E @ onehot.T + log_prior  # (n, P) log p(x, z)
        w = np.exp(log_joint - _logsumexp(log_joint, axis=1)[:, None])  # (n, P) p(z | x)
        marginals[rows, :L] = (w @ onehot).reshape(len(rows), L, K)
    return marginals


def bayes_outputs(kind: str, spec: TaskSpec, split: Split) -> np.ndarray:
    """The Bayes-optimal predictions for a target split, shaped like a model's outputs so that
    train.metrics scores them (the target chains at spec.relatedness, uniform topic prior):

    - topic:   log p(k | x)                                  (N, K)    argmax = Bayes class
    - binary:  log [p(y=0 | x), p(y=1 | x)], y = 1 for topics k < K // 2          (N, 2)
    - tagging: log p(z_t = k | x), 0 on pads                 (N, T, K) argmax per token
    - score:   E[fraction of real tokens with z_t = SCORE_TOPIC | x]              (N,)

    Softmax of a log-posterior is the posterior, so the binary AUC is computed from
    p(y=1 | x). The score is the posterior mean, the Bayes estimator under squared error."""
    chains = target_chains(spec)
    K = spec.n_topics
    real = _real_tokens(split.x, split.mask, spec.n_tokens)  # (N, T)
    if kind in ("topic", "binary"):
        ll = chains.log_likelihood(split.x, real)  # (N, K) log p(x | k)
        log_post = ll - _logsumexp(ll, axis=1)[:, None]  # (N, K)
        if kind == "topic":
            return log_post
        first = _logsumexp(log_post[:, : K // 2], axis=1)  # (N,) log p(y = 1 | x)
        rest = _logsumexp(log_post[:, K // 2 :], axis=1)  # (N,) log p(y = 0 | x)
        return np.stack([rest, first], axis=1)  # (N, 2)
    if kind not in ("tagging", "score"):
        raise ValueError(f"unknown target kind {kind!r}")
    marginals = topic_marginals(chains, kind, split.x, real)  # (N, T, K)
    if kind == "tagging":
        return _log(marginals)
    return marginals[:, :, SCORE_TOPIC].sum(axis=1) / real.sum(axis=1)  # (N,)


def bayes_ceiling(kind: str, spec: TaskSpec, split: Split) -> dict:
    """train.metrics of the Bayes-optimal predictions (`bayes_outputs`): no model beats the
    accuracy (or the MSE, for score) on average. See docs/baselines.md#the-bayes-ceiling."""
    return metrics(kind, bayes_outputs(kind, spec, split), split)


# ----------------------------------------------------------------------------------------
# the count baseline


def count_chains(x, real, weights, n_tokens: int, alpha: float = 0.1) -> MarkovMixture:
    """One Markov chain per class from add-alpha smoothed counts of the training tokens.

    x, real (N, T); weights (N, T, C): how much token t of row n counts for class c (one-hot
    for hard labels). With c_t the class of token t:

        initial[c, j]     = (sum_n w[n, 0, c] [x_0 = j] + alpha) / (sum_n w[n, 0, c] + V alpha)
        transitions[c, i, j] = (sum_{n, t>=1} w[n, t, c] [x_{t-1} = i, x_t = j] + alpha) / (row sum)

    A transition is counted for the class of the token it produces, as the chains generate
    it (at a switch the new topic's chain continues from the previous token)."""
    V, C = n_tokens, weights.shape[-1]
    init = np.full((C, V), float(alpha))  # (C, V)
    trans = np.full((C, V, V), float(alpha))  # (C, V, V)
    first = real[:, 0]  # (N,)
    step = real[:, 1:]  # (N, T-1) a real token with a real token before it
    prev, nxt = x[:, :-1][step], x[:, 1:][step]  # (M,) each
    for c in range(C):
        np.add.at(init[c], x[first, 0], weights[first, 0, c])  # add.at: a token may repeat
        np.add.at(trans[c], (prev, nxt), weights[:, 1:, c][step])
    return MarkovMixture(init / init.sum(axis=-1, keepdims=True),
                         trans / trans.sum(axis=-1, keepdims=True))


def forward_backward(log_emit, log_start, log_switch):
    """Posterior marginals of a hidden Markov chain, in log space: (N, T, K) -> (N, T, K).

        a_t(k) = e_t(k) + logsumexp_j(a_{t-1}(j) + log S[j, k]),   a_0(k) = log s(k) + e_0(k)
        b_t(j) = logsumexp_k(log S[j, k] + e_{t+1}(k) + b_{t+1}(k)),  b_{T-1} = 0
        log p(z_t = k | x) = a_t(k) + b_t(k) - logsumexp_k(a_t(k) + b_t(k))

    Trailing pads carry e_t = 0: rows of S sum to one, so they are summed out exactly and
    change nothing before them."""
    N, T, K = log_emit.shape
    a = np.empty((N, T, K))  # (N, T, K)
    b = np.zeros((N, T, K))  # (N, T, K)
    a[:, 0] = log_start + log_emit[:, 0]
    for t in range(1, T):
        a[:, t] = log_emit[:, t] + _logsumexp(a[:, t - 1, :, None] + log_switch, axis=1)
    for t in range(T - 2, -1, -1):
        b[:, t] = _logsumexp(log_switch + (log_emit[:, t + 1] + b[:, t + 1])[:, None, :], axis=2)
    ab = a + b  # (N, T, K)
    return ab - _logsumexp(ab, axis=2)[:, :, None]


def count_outputs(kind: str, train_split: Split, eval_split: Split, n_tokens: int,
                  n_classes: int, alpha: float = 0.1) -> np.ndarray:
    """The count model's predictions on `eval_split`, shaped like a model's outputs.

    - topic, binary: one counted chain per class (`count_chains`); log p(c | x) with a
      uniform class prior, x scored by the sum of its token log-probabilities.
    - tagging: the counted chain of each tag, and a hidden Markov chain over the tags whose
      switch matrix S is add-alpha counts of consecutive training tags (a uniform first
      tag); `forward_backward` gives log p(z_t = k | x). Everything comes from the
      training split; nothing is known about segment lengths beyond what S has counted.
    - score: the training rows carry only the fraction y, not per-token topics, so two
      chains are counted with soft weights: every token of a row counts y for SCORE_TOPIC
      and 1 - y for "other". A token's posterior of SCORE_TOPIC is then
      p * A_0(x_t | x_{t-1}) / (p * A_0 + (1 - p) * A_1) with the prior p = mean training y;
      the score is its mean over the row's real tokens, clipped to [0, 1].
    """
    tr_real = _real_tokens(train_split.x, train_split.mask, n_tokens)
    ev_real = _real_tokens(eval_split.x, eval_split.mask, n_tokens)
    N, T = train_split.x.shape
    if kind in ("topic", "binary"):
        weights = np.zeros((N, T, n_classes))
        weights[np.arange(N), :, train_split.y] = 1.0  # every token counts for its row's class
        chains = count_chains(train_split.x, tr_real, weights, n_tokens, alpha)
        ll = chains.log_likelihood(eval_split.x, ev_real)  # (N_eval, C)
        return ll - _logsumexp(ll, axis=1)[:, None]
    if kind == "tagging":
        tags = np.where(tr_real, train_split.y, 0)  # (N, T) pads point at tag 0 with weight 0
        weights = (tags[:, :, None] == np.arange(n_classes)) & tr_real[:, :, None]  # (N, T, C)
        chains = count_chains(train_split.x, tr_real, weights.astype(np.float64), n_tokens, alpha)
        switch = np.full((n_classes, n_classes), float(alpha))  # (C, C)
        both = tr_real[:, 1:]  # (N, T-1)
        np.add.at(switch, (tags[:, :-1][both], tags[:, 1:][both]), 1.0)
        log_switch = np.log(switch / switch.sum(axis=1, keepdims=True))
        log_emit = _token_log_probs(chains, eval_split.x, ev_real)  # (N_eval, T, C)
        log_start = np.full(n_classes, -math.log(n_classes))
        return forward_backward(log_emit, log_start, log_switch)
    if kind == "score":
        y = np.asarray(train_split.y, dtype=np.float64)  # (N,)
        weights = np.stack([y, 1.0 - y], axis=1)[:, None, :] * tr_real[:, :, None]  # (N, T, 2)
        chains = count_chains(train_split.x, tr_real, weights, n_tokens, alpha)
        p = float(y.mean())
        log_prior = np.log(np.array([p, 1.0 - p]).clip(1e-12, 1.0))  # (2,)
        terms = _token_log_probs(chains, eval_split.x, ev_real) + log_prior  # (N_eval, T, 2)
        post = np.exp(terms[..., 0] - _logsumexp(terms, axis=2))  # (N_eval, T) p(SCORE_TOPIC)
        score = (post * ev_real).sum(axis=1) / ev_real.sum(axis=1)  # (N_eval,)
        return np.clip(score, 0.0, 1.0)
    raise ValueError(f"unknown target kind {kind!r}")


def count_baseline(kind: str, train_split: Split, eval_split: Split, n_tokens: int,
                   n_classes: int, alpha: float = 0.1) -> dict:
    """train.metrics of the count model (`count_outputs`), fitted on `train_split` only and
    scored on `eval_split`. See docs/baselines.md#the-count-baseline."""
    outputs = count_outputs(kind, train_split, eval_split, n_tokens, n_classes, alpha)
    return metrics(kind, outputs, eval_split)


# ----------------------------------------------------------------------------------------
# chance


def chance_baseline(kind: str, train_split: Split, eval_split: Split) -> dict:
    """Predict without looking at the input: the most frequent training class (topic, binary;
    the most frequent tag over real training tokens for tagging; ties go to the lower id),
    or the mean training score. Scored by train.metrics, so binary AUC is 0.5."""
    y = np.asarray(train_split.y)
    if kind == "score":
        outputs = np.full(len(eval_split), float(y.mean()))  # (N_eval,)
        return metrics(kind, outputs, eval_split)
    labels = y[y != IGNORE_INDEX]  # every training label that counts
    majority = int(np.bincount(labels).argmax())
    n_classes = max(majority + 1, 2)  # only the argmax matters; binary's AUC reads column 1
    onehot = np.eye(n_classes)[majority]  # (C,) a constant "logit" row
    shape = eval_split.y.shape + (n_classes,)  # (N, C) or (N, T, C)
    return metrics(kind, np.broadcast_to(onehot, shape), eval_split)


# ----------------------------------------------------------------------------------------
# for results JSON


def baselines_for(kind: str, spec: TaskSpec, target_data: TargetData, seed: int) -> list[dict]:
    """The three references on the test split, as entries of the results' `baselines` list."""
    train, test = target_data.train, target_data.test
    found = {
        "chance": chance_baseline(kind, train, test),
        "count": count_baseline(kind, train, test, spec.n_tokens, target_data.n_classes),
        "bayes": bayes_ceiling(kind, spec, test),
    }
    return [{"name": name, "task": kind, "seed": int(seed), "relatedness": float(spec.relatedness),
             "target": target} for name, target in found.items()]


def source_reference(spec: TaskSpec) -> dict:
    """The optimal LM loss on the source validation split (the one the pretrained model's
    source LM loss is measured on)."""
    tokens = make_source(spec).val
    return {"optimal_lm_loss": optimal_lm_loss(source_chains(spec), tokens, spec.pad_id)}
