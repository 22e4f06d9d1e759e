"""Draw the figures of the walkthrough into docs/figures/.

    python src/figures.py                      # both figures
    python src/figures.py architecture         # only one of them
    python src/figures.py attention
    python src/figures.py --help               # this text

architecture.png  the GPT-2 of src/transferlab/model.py as boxes and arrows: embedding,
                  one block on the residual stream (repeated L times), ln_f, three heads.
attention.png     every head's attention matrix att (T, T) of the pretrained model on one
                  source sequence, next to the same heads before pretraining.

The attention figure needs the pretrained source LM. It uses the one `python src/main.py`
caches in cache/ (the same config.yaml gives the same cache key), and pretrains it with
the project's own training loop when it is not there yet (about a minute on 2 cores).
The blocks run through model.py's own `block_forward`; at each block the matrices are
recomputed by hand from the block's qkv, the way docs/attention.md writes the forward pass,
and checked against the attention weights the block keeps in its cache.
"""
from __future__ import annotations

import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent
if str(SRC) not in sys.path:  # so `python src/figures.py` works from any directory
    sys.path.insert(0, str(SRC))

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch  # noqa: E402

ROOT = SRC.parent
OUT = ROOT / "docs" / "figures"

# one colour per kind of thing, used in both figures' legends
COLORS = {
    "embed": "#cfe2f3",  # embeddings
    "norm": "#fff2cc",  # LayerNorms
    "attn": "#f4cccc",  # attention
    "mlp": "#d9ead3",  # MLP
    "head": "#e6d5f0",  # heads
    "data": "#eeeeee",  # inputs and outputs
}


# ---------------------------------------------------------------------------- architecture


def _box(ax, x, y, w, h, text, color, fontsize=9, bold=False):
    """A rounded box with its centre at (x, y)."""
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=color, edgecolor="#333333", linewidth=1.0))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize,
            fontweight="bold" if bold else "normal", linespacing=1.25)


def _arrow(ax, start, end, style="-|>", color="#333333", lw=1.3, ls="-", rad=0.0):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=12, color=color,
                                 linewidth=lw, linestyle=ls, connectionstyle=f"arc3,rad={rad}",
                                 shrinkA=0, shrinkB=0))


def _plus(ax, x, y):
    ax.add_patch(Circle((x, y), 0.17, facecolor="white", edgecolor="#333333", linewidth=1.3, zorder=3))
    ax.text(x, y, "+", ha="center", va="center", fontsize=13, fontweight="bold", zorder=4)


def draw_architecture(path):
    """docs/figures/architecture.png: GPT-2 with its three heads (model.py's forward)."""
    fig, ax = plt.subplots(figsize=(11, 13.5))
    ax.set_xlim(0, 11)
    ax.set_ylim(0, 13.7)
    ax.axis("off")
    S = 3.0  # x of the residual stream

    # ---- bottom: tokens -> embedding
    _box(ax, S, 0.45, 2.6, 0.55, "idx  (B, T)  token ids", COLORS["data"])
    _box(ax, S, 1.45, 3.6, 0.85,
         "embedding:  x = wte[idx] + wpe[:T]\nwte (V, C)   wpe (block_size, C)   + dropout",
         COLORS["embed"])
    _arrow(ax, (S, 0.73), (S, 1.02))
    ax.text(S + 1.95, 1.45, "docs/embeddings.md", fontsize=8, color="#555555", va="center")

    # ---- one block, repeated L times
    y0, y1 = 2.25, 9.35  # the block's frame
    ax.add_patch(FancyBboxPatch((0.55, y0), 9.9, y1 - y0, boxstyle="round,pad=0.02,rounding_size=0.15",
                                facecolor="none", edgecolor="#888888", linewidth=1.2, linestyle="--"))
    ax.text(S + 0.3, y1 - 0.28, "block h.{i}   (repeated L = n_layer times)", fontsize=10, fontweight="bold",
            color="#555555")
    ax.text(S + 0.3, y1 - 0.58, "forward: model.py::block_forward    backward: model.py::block_backward",
            fontsize=8, color="#555555")

    # the residual stream: a thick line from the embedding to ln_f
    ax.plot([S, S], [1.88, 9.73], color="#1f4e79", linewidth=4, solid_capstyle="butt", zorder=1)
    ax.text(S - 0.32, 4.1, "residual stream  x  (B, T, C)", rotation=90, ha="right", va="center",
            fontsize=10, color="#1f4e79", fontweight="bold")

    # attention branch: fork at y=2.8, add back at y=5.3
    X = 6.7  # x of the branches
    fork_a, add_a = 2.75, 5.4
    _arrow(ax, (S, fork_a), (X - 1.2, fork_a), color="#1f4e79")
    ax.text(S + 0.15, fork_a + 0.12, "fork", fontsize=8, color="#1f4e79")
    _box(ax, X, fork_a, 2.4, 0.5, "ln_1  LayerNorm", COLORS["norm"])
    _box(ax, X, 3.55, 3.5, 0.6, "c_attn:  qkv = x @ W + b\n(C, 3C) -> qkv (B, T, 3C)", COLORS["attn"], fontsize=8.5)
    _box(ax, X, 4.5, 4.6, 0.95,
         "attention (NH heads, HS = C / NH)\natt = softmax(q k^T / sqrt(HS) + mask)  (B, NH, T, T)\n"
         "att = dropout(att)   attention dropout\ny = att v  -> (B, T, C)",
         COLORS["attn"], fontsize=8.5)
    _box(ax, X, add_a, 3.2, 0.5, "c_proj (C, C)  + dropout", COLORS["attn"], fontsize=8.5)
    _arrow(ax, (X, fork_a + 0.25), (X, 3.25))
    _arrow(ax, (X, 3.85), (X, 4.02))
    _arrow(ax, (X, 4.98), (X, add_a - 0.25))
    _arrow(ax, (X - 1.6, add_a), (S + 0.17, add_a), color="#1f4e79")
    _plus(ax, S, add_a)
    ax.text(S - 0.3, add_a, "x = x + attn(ln_1(x))", ha="right", va="center", fontsize=8.5)

    # MLP branch: fork at y=5.95, add back at y=8.3
    fork_m, add_m = 6.0, 8.3
    _arrow(ax, (S, fork_m), (X - 1.2, fork_m), color="#1f4e79")
    ax.text(S + 0.15, fork_m + 0.12, "fork", fontsize=8, color="#1f4e79")
    _box(ax, X, fork_m, 2.4, 0.5, "ln_2  LayerNorm", COLORS["norm"])
    _box(ax, X, 6.75, 3.6, 0.55, "c_fc:  fch = x @ W + b   (C, 4C)", COLORS["mlp"], fontsize=8.5)
    _box(ax, X, 7.5, 3.0, 0.5, "GELU (tanh)  fch_gelu", COLORS["mlp"], fontsize=8.5)
    _box(ax, X, add_m, 3.6, 0.5, "c_proj (4C, C)  + dropout", COLORS["mlp"], fontsize=8.5)
    _arrow(ax, (X, fork_m + 0.25), (X, 6.47))
    _arrow(ax, (X, 7.03), (X, 7.25))
    _arrow(ax, (X, 7.75), (X, add_m - 0.25))
    _arrow(ax, (X - 1.8, add_m), (S + 0.17, add_m), color="#1f4e79")
    _plus(ax, S, add_m)
    ax.text(S - 0.3, add_m, "x = x + mlp(ln_2(x))", ha="right", va="center", fontsize=8.5)

    # the fan-out rule, where it applies
    ax.text(X + 2.45, 2.75, "backward: the gradient at a fork\nis the SUM of both paths:\n"
            "dx = dx + d(branch)\n(docs/residual.md)", fontsize=8, color="#7f0000", va="center")
    # which page explains which box
    for y, page in ((fork_a, "docs/layernorm.md"), (3.55, "docs/linear.md"), (4.5, "docs/attention.md"),
                    (7.5, "docs/gelu.md"), (add_m, "docs/dropout.md")):
        if y != fork_a:
            ax.text(X + 2.45, y, page, fontsize=8, color="#555555", va="center")
    ax.text(X + 2.45, fork_m, "docs/layernorm.md", fontsize=8, color="#555555", va="center")

    # ---- ln_f and h
    _box(ax, S, 10.0, 2.6, 0.55, "ln_f  LayerNorm", COLORS["norm"])
    _box(ax, S, 10.95, 3.4, 0.55, "h  (B, T, C)   backbone output", COLORS["data"])
    _arrow(ax, (S, 10.28), (S, 10.67))

    # ---- the three heads
    heads = [
        (1.9, "LM head (tied)\nlogits = h @ wte^T\n(B, T, V)\ncross-entropy"),
        (5.3, "token head\nh @ W + b\n(B, T, K)\ncross-entropy, pads ignored"),
        (8.9, "sequence head\npool: cls | last | mean | attention\n-> (B, C) @ W + b\n"
              "(B, K) classes  or  sigmoid (B,) score"),
    ]
    for x, text in heads:
        _box(ax, x, 12.6, 3.2 if x > 8 else 2.9, 1.2, text, COLORS["head"], fontsize=8.5)
        _arrow(ax, (S, 11.23), (x, 12.0), rad=0.0)
    ax.text(5.3, 13.4, "one head at a time: GPTConfig.head = lm | token | sequence   (docs/heads.md)",
            ha="center", fontsize=9)
    # the tie: the LM head reuses wte (a dashed line from the LM head down to the embedding)
    tie = dict(color="#7f0000", linestyle="--", linewidth=1.3)
    ax.plot([0.32, 0.32], [1.45, 12.6], **tie)
    ax.plot([0.32, 0.45], [12.6, 12.6], **tie)
    ax.plot([0.32, S - 1.8], [1.45, 1.45], **tie)
    ax.text(0.17, 7.0, "tied: the LM head IS wte; its gradients from both uses add up (docs/tied_weights.md)",
            rotation=90, fontsize=8, color="#7f0000", va="center", ha="center")
    ax.set_title("transferlab: GPT-2 in NumPy, with three heads", fontsize=13, fontweight="bold", pad=4)
    _save(fig, path)


# ---------------------------------------------------------------------------- attention


def pretrained_model():
    """The cached pretrained source LM for config.yaml (pretrained first if missing)."""
    from transferlab.checkpoint import model_from_checkpoint
    from transferlab.config import load_config, replace_in
    from transferlab.runner import ensure_pretrained

    config = load_config(ROOT / "config.yaml", env=False)
    # resolve the cache against the repository, whatever the current directory is
    config = replace_in(config, "runner.cache_dir", str(ROOT / config.runner.cache_dir))
    path, info = ensure_pretrained(config, None, progress=True)
    print(f"pretrained model: {path} ({'cached' if info['cached'] else 'just trained'})")
    return config, model_from_checkpoint(path).eval()


def attention_maps(model, idx):
    """att (L, NH, T, T) of every block for the token ids idx (1, T).

    Runs the blocks with model.py's block_forward, in inference mode, through the model's
    own kernel table. At each block the attention weights are recomputed from the block's
    own qkv exactly as docs/attention.md writes them, and checked against the weights the
    block's attention layer kept in its cache (BlockCache.att).
    """
    from transferlab.layers import attention_mask
    from transferlab.model import block_forward

    cfg, p, K = model.config, model.params, model.kernels
    B, T = idx.shape
    NH, C = cfg.n_head, cfg.n_embd
    HS = C // NH
    allowed = attention_mask(T, cfg.is_causal)  # (1, 1, T, T)
    x, _ = K.embedding_forward(idx, p["wte.weight"], p["wpe.weight"])  # (B, T, C)
    maps = []
    for i in range(cfg.n_layer):
        w = model.block_params(i)
        x, cache = block_forward(x, w, NH, allowed, kernels=K)  # (B, T, C); rng=None: no dropout
        ln1, _ = cache.qkv  # the c_attn layer's cache: its input ln_1(x) and its weight
        qkv = ln1 @ w["attn.c_attn.weight"] + w["attn.c_attn.bias"]  # (B, T, 3C)
        q, k, v = qkv.reshape(B, T, 3, NH, HS).transpose(2, 0, 3, 1, 4)  # each (B, NH, T, HS)
        preatt = q @ k.transpose(0, 1, 3, 2) / np.sqrt(HS)  # (B, NH, T, T)
        preatt = np.where(allowed, preatt, -np.inf)
        att = np.exp(preatt - preatt.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)  # (B, NH, T, T)
        # the attention layer's cache is (q or q * scale, k, v, att, att_used, dropout, scale)
        # in both kernel tables: att is its fourth entry
        assert np.allclose(att, cache.att[3], atol=1e-5), "attention by hand disagrees with the block's"
        maps.append(att[0])
    # the walk above must be the model's own forward pass
    h, _ = K.layernorm_forward(x, p["ln_f.weight"], p["ln_f.bias"])
    assert np.allclose(h, model.backbone(idx), atol=1e-5), "block_forward walk disagrees with GPT.backbone"
    return np.stack(maps)  # (L, NH, T, T)


def draw_attention(path):
    """docs/figures/attention.png: att of every head, pretrained vs random init."""
    from transferlab import GPT
    from transferlab.runner import task_spec
    from transferlab.tasks import make_source

    config, model = pretrained_model()
    spec = task_spec(config)
    source = make_source(spec)
    row = 0
    idx = source.val[row:row + 1, :-1]  # (1, T): the LM sees T = seq_len - 1 tokens
    topic = int(source.val_topics[row])
    trained = attention_maps(model, idx)
    random_init = attention_maps(GPT(model.config, seed=0).eval(), idx)
    L, NH, T, _ = trained.shape

    fig, axes = plt.subplots(L + 1, NH, figsize=(3.3 * NH, 3.3 * (L + 1)), squeeze=False)
    rows = [(f"pretrained h.{i}", trained[i]) for i in range(L)] + [("random init h.0", random_init[0])]
    ticks = np.arange(0, T, 5)
    for r, (label, att) in enumerate(rows):
        for hd in range(NH):
            ax = axes[r, hd]
            im = ax.imshow(att[hd], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            if r < L:
                # the token that receives the most attention (queries t >= 1, keys s >= 1):
                # a head that looks for one token lights up a column wherever it occurs
                mass = np.bincount(idx[0, 1:], weights=att[hd, 1:, 1:].sum(axis=0))
                top = int(mass.argmax())
                where = np.flatnonzero(idx[0] == top)
                ax.plot(where, np.full(len(where), -1.3), "v", color="#d62728", markersize=4, clip_on=False)
                ax.set_title(f"{label}, head {hd}\nmost attended: token {top} (marked)", fontsize=8.5, pad=10)
            else:
                ax.set_title(f"{label}, head {hd}\nnearly uniform over the past", fontsize=8.5, pad=10)
            ax.set_ylim(T - 0.5, -0.5)
            ax.set_xticks(ticks)
            ax.set_yticks(ticks)
            ax.tick_params(labelsize=7)
            if hd == 0:
                ax.set_ylabel("query position t", fontsize=8)
            if r == L:
                ax.set_xlabel("key position s", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.6, label="att[t, s]  (each row sums to 1)")
    tokens = " ".join(str(int(t)) for t in idx[0])
    fig.suptitle(f"Attention of the pretrained source LM on one source sequence (topic {topic}, T = {T})\n"
                 f"tokens: {tokens}", fontsize=10)
    _save(fig, path, tight=False)


# ---------------------------------------------------------------------------- main


def _save(fig, path, tight=True):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


FIGURES = {"architecture": draw_architecture, "attention": draw_attention}


def main(argv=None):
    names = (sys.argv[1:] if argv is None else argv) or list(FIGURES)
    if any(n in ("-h", "--help") for n in names):
        print(__doc__)
        return 0
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        print(f"error: unknown figure {unknown[0]!r}; choose from {', '.join(FIGURES)}", file=sys.stderr)
        return 2
    for name in names:
        FIGURES[name](OUT / f"{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
