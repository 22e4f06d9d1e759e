"""Synthetic source and target tasks: a mixture of Markov chains ("topics") over one alphabet.

Source: language modelling on sequences drawn from K Markov chains. Each sequence comes
from one chain, and the chains are sparse and distinct, so the next token is predictable
only once the model has worked out from the context which chain it is reading. That topic
inference is the representation transfer should reuse.

Targets, one per model head, each a small labelled set:

- topic:   which of the K topics generated the sequence (K-way sequence classification)
- binary:  is that topic in the first half, 0 .. K//2 - 1 (2-way sequence classification)
- tagging: sequences that switch topic part-way; tag every token with its current topic
- score:   the fraction of tokens drawn from topic 0 (SCORE_TOPIC), a float in [0, 1]

The target chains are `relatedness * source + (1 - relatedness) * fresh`, so relatedness 1
reuses the source topics and 0 gives unrelated ones. Chain tokens are ids 0 .. n_tokens-1,
PAD = n_tokens, vocab_size = n_tokens + 1 (a CLS id, if wanted, is vocab_size: see
append_cls). Everything derives from integer seeds. See docs/tasks.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .knobs import Rule, check_knobs, check_value, knob
from .losses import IGNORE_INDEX


@dataclass(frozen=True)
class TaskKind:
    """What a kind of task needs from the model and how its results are judged."""

    head: str  # the model head: "lm", "token" or "sequence"
    output: str  # the sequence head's output: "classify" or "score"
    metric: str  # the number early stopping, the table and the plots watch
    goal: str  # "max" or "min": which way that number is better


# The registry of task kinds, declared once: config choices, the runner's head switch and
# the training loop's early stopping all read it. "lm" is pretraining's kind.
LM_KIND = TaskKind(head="lm", output="classify", metric="loss", goal="min")
TASK_KINDS = {
    "topic": TaskKind(head="sequence", output="classify", metric="accuracy", goal="max"),
    "binary": TaskKind(head="sequence", output="classify", metric="accuracy", goal="max"),
    "tagging": TaskKind(head="token", output="classify", metric="accuracy", goal="max"),
    "score": TaskKind(head="sequence", output="score", metric="mse", goal="min"),
}
TARGET_KINDS = tuple(TASK_KINDS)


def task_kind(kind: str) -> TaskKind:
    """The registry entry of a target kind, or of "lm" (pretraining)."""
    if kind == "lm":
        return LM_KIND
    if kind not in TASK_KINDS:
        raise ValueError(f"unknown task kind {kind!r}; choose one of lm, {', '.join(TASK_KINDS)}")
    return TASK_KINDS[kind]


INIT_CONCENTRATION = 1.0  # broad first-token distributions: one token says little about the topic
SMOOTHING = 1e-3  # mass spread over every row: no transition is impossible, log p stays finite
MIN_SEGMENT = 3  # tokens per topic segment (tagging, score): enough for a topic to show itself
MAX_SEGMENTS = 3  # segments per tagging/score sequence: 2 or 3, so one or two switches
SCORE_TOPIC = 0  # the score target is the fraction of tokens drawn from this topic

# Independent random streams from one integer seed (SeedSequence spawn keys). Chains (the
# "world") and samples never share a stream, so a new sampling seed keeps the chains, and
# each split has its own stream, so changing n_target_train leaves the test set alone.
_SOURCE_WORLD, _FRESH_WORLD, _SOURCE_SAMPLES, _TARGET_SAMPLES = range(4)


def _rng(seed, *stream):
    """A Generator for one named stream of `seed`."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=stream))


def _check_seed(seed, name):
    return int(check_value(seed, int, {"ge": 0}, name))


# ----------------------------------------------------------------------------------------
# the specification


@dataclass(frozen=True)
class TaskSpec:
    """Every knob of the synthetic world and of the data sets drawn from it.

    Declared once, here: config.yaml's `task` section is these knobs (its seed is the
    config's seed), with these defaults, docs and rules. So TaskSpec() is the shipped task.
    """

    n_tokens: int = knob(24, "vocabulary of the Markov chains (PAD = n_tokens)", ge=2)
    n_topics: int = knob(4, "number of chains (topics)", ge=2)
    seq_len: int = knob(16, "tokens per sequence (T: every array has this many columns)",
                        ge=2 * MIN_SEGMENT + 1)
    concentration: float = knob(0.3, "Dirichlet concentration of chain rows (small = peaky)", gt=0)
    relatedness: float = knob(1.0, "1 = target chains are the source chains, 0 = fresh ones",
                              ge=0, le=1)
    n_source_train: int = knob(50000, "source training sequences", ge=1)
    n_source_val: int = knob(200, "source validation sequences", ge=1)
    n_target_train: int = knob(48, "target training examples (small on purpose)", ge=1)
    n_target_val: int = knob(128, "target validation examples", ge=1)
    n_target_test: int = knob(512, "target test examples", ge=1)
    min_len: int = knob(6, "shortest target sequence (the rest is padding); a tagging row "
                           "needs two 3-token segments", ge=2 * MIN_SEGMENT)
    seed: int = knob(0, "the world: which chains exist (source and target chains derive "
                        "from it)", ge=0)

    # Target lengths are uniform in [min_len, seq_len - 1]: the last slot is kept for CLS.
    RULES = (Rule("min_len", "seq_len", lambda s: s.min_len <= s.seq_len - 1,
                  lambda s, name: f"<= {name('seq_len')} - 1 ({s.seq_len - 1}: one slot "
                                  f"stays free for a CLS token)"),)

    def __post_init__(self):
        check_knobs(self)

    @property
    def pad_id(self) -> int:
        return self.n_tokens

    @property
    def vocab_size(self) -> int:
        return self.n_tokens + 1


# ----------------------------------------------------------------------------------------
# data containers


@dataclass
class Split:
    """One labelled set. x (N, T) int64 token ids, PAD after each row's end; mask (N, T) bool,
    True on real tokens (a prefix of every row); y (N,) int64 class ids, (N, T) int64 tags with
    IGNORE_INDEX on pads, or (N,) float64 scores in [0, 1]; topics (N, T) int64, the topic
    that generated each token (IGNORE_INDEX on pads), the ground truth behind every label."""

    x: np.ndarray
    y: np.ndarray
    mask: np.ndarray
    topics: np.ndarray | None = None

    def __post_init__(self):
        if self.x.ndim != 2 or self.mask.shape != self.x.shape or len(self.y) != len(self.x):
            raise ValueError(
                f"Split needs x (N, T), mask (N, T), y with N rows; got x {self.x.shape}, "
                f"mask {self.mask.shape}, y {self.y.shape}"
            )

    def __len__(self):
        return len(self.x)

    def batch(self, index) -> "Split":
        """The rows at `index` (an index array or a slice), as a new Split."""
        topics = None if self.topics is None else self.topics[index]
        return Split(self.x[index], self.y[index], self.mask[index], topics)


@dataclass
class SourceData:
    """Language-modelling data: full-length sequences, one topic each (topics kept for probes)."""

    train: np.ndarray  # (N, T) int64
    val: np.ndarray  # (N_val, T) int64
    vocab_size: int
    pad_id: int
    train_topics: np.ndarray | None = None  # (N,) int64
    val_topics: np.ndarray | None = None  # (N_val,) int64


@dataclass
class TargetData:
    kind: str
    train: Split
    val: Split
    test: Split
    n_classes: int  # K for topic and tagging, 2 for binary, 1 for score
    vocab_size: int
    pad_id: int


# ----------------------------------------------------------------------------------------
# the chains


def _inverse_cdf(cdf, u):
    """One draw per row: the index j with cdf[j-1] <= u < cdf[j].  cdf (n, V), u (n,) -> (n,).

    u is uniform on [0, 1), so j comes up with probability cdf[j] - cdf[j-1] = p_j."""
    return (u[:, None] >= cdf).sum(axis=1)


class MarkovMixture:
    """K Markov chains over one alphabet of V tokens, one chain per topic.

    initial (K, V):        p(x_0 = j | topic k)
    transitions (K, V, V): p(x_t = j | x_{t-1} = i, topic k), each row sums to 1
    """

    def __init__(self, initial, transitions):
        initial = np.asarray(initial, dtype=np.float64)  # (K, V)
        transitions = np.asarray(transitions, dtype=np.float64)  # (K, V, V)
        K, V = initial.shape
        if transitions.shape != (K, V, V):
            raise ValueError(f"transitions must have shape {(K, V, V)}, got {transitions.shape}")
        for name, p in (("initial", initial), ("transitions", transitions)):
            if np.any(p < 0) or not np.allclose(p.sum(axis=-1), 1.0, atol=1e-9):
                raise ValueError(f"{name} rows must be probability distributions")
        self.initial = initial
        self.transitions = transitions
        # cumulative rows for inverse-CDF sampling; the last entry is exactly 1 so that
        # rounding can never push a draw u < 1 past the last token
        self._initial_cdf = np.cumsum(initial, axis=-1)  # (K, V)
        self._initial_cdf[..., -1] = 1.0
        self._transition_cdf = np.cumsum(transitions, axis=-1)  # (K, V, V)
        self._transition_cdf[..., -1] = 1.0

    @property
    def n_topics(self) -> int:
        return self.initial.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.initial.shape[1]

    def sample(self, rng, n, length, topics=None):
        """n sequences of `length` tokens, each from one topic (uniform unless `topics` (n,)
        is given). Returns tokens (n, length) int64 and topics (n,) int64."""
        if topics is None:
            topics = rng.integers(self.n_topics, size=n)
        topics = np.asarray(topics, dtype=np.int64)
        if topics.shape != (n,):
            raise ValueError(f"topics must have shape ({n},), got {topics.shape}")
        path = np.repeat(topics[:, None], length, axis=1)  # (n, length)
        return self.sample_path(rng, path), topics

    def sample_path(self, rng, path):
        """Tokens along a topic path (n, L): token t comes from the chain of topic path[:, t].

        At a switch the new chain continues from the previous token, so a sequence stays one
        sequence. Vectorised over the n rows; the only loop is over time."""
        n, L = path.shape
        u = rng.random((n, L))  # (n, L) one uniform per token
        tokens = np.empty((n, L), dtype=np.int64)  # (n, L)
        tokens[:, 0] = _inverse_cdf(self._initial_cdf[path[:, 0]], u[:, 0])
        for t in range(1, L):
            cdf = self._transition_cdf[path[:, t], tokens[:, t - 1]]  # (n, V) next-token CDFs
            tokens[:, t] = _inverse_cdf(cdf, u[:, t])
        return tokens

    def log_likelihood(self, tokens, mask=None):
        """log p(sequence | topic k) for every k:  tokens (n, L), mask (n, L) bool -> (n, K).

            log p(x | k) = log pi_k[x_0] + sum_{t >= 1} log A_k[x_{t-1}, x_t]

        over the real tokens (mask True, a prefix of each row; default: all)."""
        tokens = np.asarray(tokens)
        mask = np.ones(tokens.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        if np.any(tokens[mask] < 0) or np.any(tokens[mask] >= self.n_tokens):
            raise ValueError(
                f"masked-in tokens must be chain tokens 0..{self.n_tokens - 1} "
                "(mask out PAD and CLS)"
            )
        x = np.where(mask, tokens, 0)  # (n, L) pads point at a real row; their terms are dropped
        with np.errstate(divide="ignore"):  # a hand-made chain may hold zeros: log 0 = -inf
            log_init = np.log(self.initial)  # (K, V)
            log_trans = np.log(self.transitions)  # (K, V, V)
        ll = np.where(mask[:, 0], log_init[:, x[:, 0]], 0.0)  # (K, n)
        steps = log_trans[:, x[:, :-1], x[:, 1:]]  # (K, n, L-1) log A_k[x_{t-1}, x_t]
        ll = ll + np.where(mask[:, :-1] & mask[:, 1:], steps, 0.0).sum(axis=-1)  # (K, n)
        return ll.T  # (n, K)

    def posterior(self, tokens, mask=None):
        """p(topic k | sequence) under a uniform prior: a softmax of the log-likelihoods. (n, K)"""
        ll = self.log_likelihood(tokens, mask)  # (n, K)
        p = np.exp(ll - ll.max(axis=1, keepdims=True))  # (n, K)
        return p / p.sum(axis=1, keepdims=True)


def mix(a: MarkovMixture, b: MarkovMixture, weight: float) -> MarkovMixture:
    """weight * a + (1 - weight) * b, entry by entry. A convex mix of two distributions is a
    distribution, so every row stays stochastic."""
    w = float(weight)
    return MarkovMixture(
        w * a.initial + (1.0 - w) * b.initial,
        w * a.transitions + (1.0 - w) * b.transitions,
    )


def _random_chains(rng, spec):
    """K chains with Dirichlet rows: a small `spec.concentration` puts most of a row's mass on
    a few next tokens, so each topic has its own few likely transitions."""
    K, V = spec.n_topics, spec.n_tokens
    initial = rng.dirichlet(np.full(V, INIT_CONCENTRATION), size=K)  # (K, V)
    transitions = rng.dirichlet(np.full(V, spec.concentration), size=(K, V))  # (K, V, V)
    return MarkovMixture(
        (1.0 - SMOOTHING) * initial + SMOOTHING / V,
        (1.0 - SMOOTHING) * transitions + SMOOTHING / V,
    )


def source_chains(spec: TaskSpec) -> MarkovMixture:
    """The source topics: determined by spec.seed (and the chain shape knobs) alone."""
    return _random_chains(_rng(spec.seed, _SOURCE_WORLD), spec)


def fresh_chains(spec: TaskSpec) -> MarkovMixture:
    """Unrelated topics from the same world seed: what the target becomes at relatedness 0."""
    return _random_chains(_rng(spec.seed, _FRESH_WORLD), spec)


def target_chains(spec: TaskSpec) -> MarkovMixture:
    """relatedness * source + (1 - relatedness) * fresh, topic by topic."""
    return mix(source_chains(spec), fresh_chains(spec), spec.relatedness)


# ----------------------------------------------------------------------------------------
# data sets


def make_source(spec: TaskSpec, seed=None) -> SourceData:
    """Full-length LM sequences from the source chains. `seed` picks the samples (default
    spec.seed); the chains always come from spec.seed."""
    seed = spec.seed if seed is None else _check_seed(seed, "make_source seed")
    chains = source_chains(spec)
    T = spec.seq_len
    train, train_topics = chains.sample(_rng(seed, _SOURCE_SAMPLES, 0), spec.n_source_train, T)
    val, val_topics = chains.sample(_rng(seed, _SOURCE_SAMPLES, 1), spec.n_source_val, T)
    return SourceData(train, val, spec.vocab_size, spec.pad_id, train_topics, val_topics)


def _segment_path(rng, lengths, T, n_topics, kind):
    """Topic of every position (n, T) for sequences made of 2..MAX_SEGMENTS segments, each at
    least MIN_SEGMENT real tokens long (fewer segments when a row is too short for more)."""
    n = len(lengths)
    pos = np.arange(T)  # (T,)
    n_seg = np.minimum(rng.integers(2, MAX_SEGMENTS + 1, size=n), lengths // MIN_SEGMENT)  # (n,)
    # Cut points with every segment >= MIN_SEGMENT tokens ("stars and bars"): take
    # MIN_SEGMENT - 1 tokens off each segment, choose n_seg - 1 distinct cuts in the shortened
    # row (segments of >= 1 token), then give each segment its tokens back.
    short = lengths - n_seg * (MIN_SEGMENT - 1)  # (n,) >= n_seg
    keys = rng.random((n, T))  # (n, T)
    keys[(pos < 1) | (pos >= short[:, None])] = np.inf  # cuts only at 1 .. short-1
    cuts = np.argsort(keys, axis=1)[:, : MAX_SEGMENTS - 1]  # (n, S-1) random distinct picks
    used = np.arange(MAX_SEGMENTS - 1)[None, :] < n_seg[:, None] - 1  # (n, S-1)
    cuts = np.sort(np.where(used, cuts, T), axis=1)  # unused cuts sit past the end
    cuts = cuts + (MIN_SEGMENT - 1) * np.arange(1, MAX_SEGMENTS)  # (n, S-1) tokens given back
    segment = (pos[None, :, None] >= cuts[:, None, :]).sum(axis=-1)  # (n, T) segment index

    if kind == "tagging":
        # consecutive segments differ, so every cut is a real switch of topic
        first = rng.integers(n_topics, size=(n, 1))  # (n, 1)
        steps = rng.integers(1, n_topics, size=(n, MAX_SEGMENTS - 1))  # (n, S-1) never 0 mod K
        offsets = np.concatenate([np.zeros((n, 1), np.int64), np.cumsum(steps, axis=1)], axis=1)
        seg_topics = (first + offsets) % n_topics  # (n, S)
    else:
        # score: segments alternate between SCORE_TOPIC and other topics, so every row mixes
        # them and the score spreads over (0, 1)
        shift = rng.integers(1, n_topics, size=(n, MAX_SEGMENTS))  # (n, S) never 0 mod K
        others = (SCORE_TOPIC + shift) % n_topics  # (n, S) any topic but SCORE_TOPIC
        starts_with_score_topic = rng.random(n) < 0.5  # (n,)
        is_score = (np.arange(MAX_SEGMENTS) % 2 == 0)[None, :] == starts_with_score_topic[:, None]
        seg_topics = np.where(is_score, SCORE_TOPIC, others)  # (n, S)
    return np.take_along_axis(seg_topics, segment, axis=1)  # (n, T)


def _make_split(kind, spec, chains, rng, n):
    T, K = spec.seq_len, spec.n_topics
    lengths = rng.integers(spec.min_len, T, size=n)  # (n,) in [min_len, T-1]: room for CLS
    if kind in ("topic", "binary"):
        path = np.repeat(rng.integers(K, size=n)[:, None], T, axis=1)  # (n, T) one topic per row
    else:
        path = _segment_path(rng, lengths, T, K, kind)  # (n, T)
    tokens = chains.sample_path(rng, path)  # (n, T); sampling past the end and cutting is the same
    mask = np.arange(T)[None, :] < lengths[:, None]  # (n, T) as sampling only `lengths` tokens
    x = np.where(mask, tokens, spec.pad_id)  # (n, T)
    topics = np.where(mask, path, IGNORE_INDEX)  # (n, T)
    if kind == "topic":
        y = path[:, 0].copy()  # (n,)
    elif kind == "binary":
        y = (path[:, 0] < K // 2).astype(np.int64)  # (n,) 1 = topic in the first half
    elif kind == "tagging":
        y = topics.copy()  # (n, T) IGNORE_INDEX on pads
    else:
        y = (topics == SCORE_TOPIC).sum(axis=1) / lengths  # (n,) float64 in [0, 1]
    return Split(x, y, mask, topics)


def make_target(kind: str, spec: TaskSpec, seed=None) -> TargetData:
    """Small labelled train/val/test splits of one target kind, from the target chains.

    `seed` picks the samples (default spec.seed). The draws do not depend on relatedness, so
    two specs that differ only in relatedness get the same lengths, topics and uniforms: a
    relatedness sweep compares like with like."""
    if kind not in TARGET_KINDS:
        raise ValueError(f"unknown target kind {kind!r}; choose one of {', '.join(TARGET_KINDS)}")
    seed = spec.seed if seed is None else _check_seed(seed, "make_target seed")
    chains = target_chains(spec)
    stream = TARGET_KINDS.index(kind)
    sizes = (spec.n_target_train, spec.n_target_val, spec.n_target_test)
    train, val, test = (
        _make_split(kind, spec, chains, _rng(seed, _TARGET_SAMPLES, stream, i), n)
        for i, n in enumerate(sizes)
    )
    n_classes = {"topic": spec.n_topics, "binary": 2, "tagging": spec.n_topics, "score": 1}[kind]
    return TargetData(kind, train, val, test, n_classes, spec.vocab_size, spec.pad_id)


def append_cls(split: Split, cls_id: int) -> Split:
    """A copy of `split` with `cls_id` written right after each row's last real token, and the
    mask True there. Labels are unchanged (a tag at the CLS slot stays IGNORE_INDEX)."""
    N, T = split.x.shape
    lengths = split.mask.sum(axis=1)  # (N,)
    if not np.array_equal(split.mask, np.arange(T)[None, :] < lengths[:, None]):
        raise ValueError("append_cls needs each row's mask to be a prefix (real tokens, then pads)")
    if np.any(lengths >= T):
        row = int(np.argmax(lengths >= T))
        raise ValueError(f"row {row} has no free slot for CLS: it is {T} real tokens long")
    rows = np.arange(N)
    x = split.x.copy()
    x[rows, lengths] = cls_id
    mask = split.mask.copy()
    mask[rows, lengths] = True
    topics = None if split.topics is None else split.topics.copy()
    return Split(x, split.y.copy(), mask, topics)


def bayes_accuracy(kind: str, spec: TaskSpec, split: Split) -> float:
    """Accuracy of the Bayes-optimal classifier on a topic or binary split: the true target
    chains, the topic posterior, then its most probable class. No model can beat it on
    average; it is the ceiling to compare against."""
    if kind not in ("topic", "binary"):
        raise ValueError(f"bayes_accuracy is defined for 'topic' and 'binary', got {kind!r}")
    real = split.mask & (split.x < spec.n_tokens)  # (N, T) chain tokens only: not PAD, not CLS
    post = target_chains(spec).posterior(split.x, real)  # (N, K)
    if kind == "topic":
        pred = post.argmax(axis=1)  # (N,)
    else:
        pred = (post[:, : spec.n_topics // 2].sum(axis=1) > 0.5).astype(np.int64)  # (N,)
    return float(np.mean(pred == split.y))
