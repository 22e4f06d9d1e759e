"""Looking inside: linear probes of every layer, before and after fine-tuning.

A linear probe asks how much of a label a layer's representation holds *linearly*: freeze
the model, mean-pool one layer's output over each sequence's real tokens, and fit a
multinomial logistic regression on those vectors. Run it on the embedding and on every
block, for the pretrained backbone and after each strategy's fine-tuning, and the table
shows where the label becomes readable and what fine-tuning changed on the way up.
See docs/probes.md.

    layer_outputs(model, idx, pad_mask)   -> [x_emb, x_1, ..., x_L], each (B, T, C)
    layer_features(model, split)          -> (L+1, N, C) mean-pooled over real tokens
    linear_probe(features, labels, train, test, l2) -> {"train_accuracy", "test_accuracy", ...}
    main()   regenerates docs/probes.md's table and figures from config.yaml:
             PYTHONPATH=src python -m transferlab.probes      (from the repository root)
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .layers import attention_mask
from .model import block_forward

ROOT = Path(__file__).resolve().parents[2]
FEATURE_BATCH = 256  # sequences per forward pass when extracting features


# ---------------------------------------------------------------------------- features


def layer_outputs(model, idx, pad_mask=None) -> list[np.ndarray]:
    """The residual stream after the embedding and after each block: L+1 arrays (B, T, C).

    Walks model.backbone's own path (the same kernels, the model's attention direction and
    padding mask) with model.py's block_forward, in inference mode (no dropout). ln_f is not
    applied: layer_outputs[-1] through ln_f is exactly model.backbone(idx, pad_mask).
    """
    cfg, p, K = model.config, model.params, model.kernels
    T = idx.shape[1]
    allowed = attention_mask(T, cfg.is_causal, pad_mask)  # (B or 1, 1, T, T)
    x, _ = K.embedding_forward(idx, p["wte.weight"], p["wpe.weight"])  # (B, T, C)
    outs = [x]
    for i in range(cfg.n_layer):
        x, _ = block_forward(x, model.block_params(i), cfg.n_head, allowed, kernels=K)  # (B, T, C)
        outs.append(x)
    return outs


def layer_features(model, split) -> np.ndarray:
    """Mean-pooled layer outputs for every sequence of a tasks.Split: (L+1, N, C) float64.

    Row l is the mean over each sequence's real tokens (split.mask) of the stream after the
    embedding (l = 0) or after block l. A model with a CLS id reads the split with the CLS
    token appended, as it was trained; padding is masked in attention as in training.
    """
    x, mask = split.x, split.mask
    if model.config.cls_id is not None:  # a cls-pooling model was trained on rows ending in CLS
        from .tasks import append_cls
        appended = append_cls(split, model.config.cls_id)
        x, mask = appended.x, appended.mask
    feats = []
    for start in range(0, len(x), FEATURE_BATCH):
        idx, real = x[start:start + FEATURE_BATCH], mask[start:start + FEATURE_BATCH]  # (B, T)
        w = real[:, :, None].astype(np.float64)  # (B, T, 1)
        pooled = [(h.astype(np.float64) * w).sum(axis=1) / w.sum(axis=1)  # (B, C)
                  for h in layer_outputs(model, idx, real)]
        feats.append(np.stack(pooled))  # (L+1, B, C)
    return np.concatenate(feats, axis=1)  # (L+1, N, C)


# ---------------------------------------------------------------------------- the probe


def linear_probe(features, labels, train, test, l2: float = 1e-3, steps: int = 500) -> dict:
    """Multinomial logistic regression on features[train], scored on features[test].

    features (N, D), labels (N,) ints in [0, K); train and test select rows (index arrays or
    boolean masks). The features are standardised with the training rows' mean and std,
    then the mean cross-entropy + l2/2 |W|^2 is minimised by full-batch gradient descent from
    zero with step 1/L, L the gradient's Lipschitz constant (|X|_2^2 / (2N) + l2): no step
    size to tune, and the same numbers on every run. Returns train and test accuracy, the
    final training loss, W (D, K), b (K,), and the standardisation (mean, std).
    """
    X = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    Xtr, ytr = X[train], y[train]  # (N, D), (N,)
    if len(Xtr) == 0:
        raise ValueError("linear_probe: the training selection is empty")
    K = int(y.max()) + 1
    mean, std = Xtr.mean(axis=0), Xtr.std(axis=0) + 1e-8  # (D,)
    Z = (Xtr - mean) / std  # (N, D)
    N, D = Z.shape
    Zb = np.concatenate([Z, np.ones((N, 1))], axis=1)  # (N, D+1) the bias as a constant feature
    onehot = np.eye(K)[ytr]  # (N, K)
    # softmax cross-entropy has Hessian <= (1/2) X^T X / N, so 1/L is a safe, monotone step
    lip = np.linalg.norm(Zb, 2) ** 2 / (2 * N) + l2
    Wb = np.zeros((D + 1, K))  # (D+1, K)
    decay = np.ones((D + 1, 1))
    decay[-1] = 0.0  # no decay on the bias
    for _ in range(steps):
        logits = Zb @ Wb  # (N, K)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)  # (N, K)
        grad = Zb.T @ (p - onehot) / N + l2 * decay * Wb  # (D+1, K)
        Wb -= grad / lip
    logits = Zb @ Wb
    loss = float(np.mean(np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1))
                         + logits.max(1) - logits[np.arange(N), ytr]))

    def accuracy(rows):
        Zs = (X[rows] - mean) / std
        return float(np.mean((Zs @ Wb[:-1] + Wb[-1]).argmax(axis=1) == y[rows]))

    return {"train_accuracy": accuracy(train), "test_accuracy": accuracy(test), "train_loss": loss,
            "W": Wb[:-1], "b": Wb[-1], "mean": mean, "std": std}


def probe_layers(features, labels, train, test, l2: float = 1e-3) -> list[float]:
    """Test accuracy of a linear probe on each layer of layer_features' (L+1, N, C) output."""
    return [linear_probe(f, labels, train, test, l2)["test_accuracy"] for f in features]


def probe_split(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed half/half split of n rows into probe-train and probe-test indices."""
    order = np.random.default_rng([seed, 7]).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2:])


# ---------------------------------------------------------------------------- the experiment

STRATEGIES = ("feature_extractor", "full_finetune", "gradual_unfreeze", "scratch")


def finetuned_model(config, strategy: str, seed: int, pretrained):
    """The model one runner.run_one call trains, returned instead of scored: the same task,
    plan, head and training loop (runner.target_model, strategies.build_plan, train.train)."""
    from . import strategies as S
    from .runner import experiment_data, target_model
    from .tasks import append_cls
    from .train import Data, train

    data = experiment_data(config)
    kind = data.kind
    target = data.target(seed)
    plan = S.build_plan(strategy, config.finetune.steps, config.model.n_layer, config.strategies)
    model = target_model(config, data, target.n_classes, pretrained, seed, random_init=not plan.pretrained)
    splits = [target.train, target.val, target.test]
    if model.config.cls_id is not None:
        splits = [append_cls(s, model.config.cls_id) for s in splits]
    train(model, Data(kind, *splits), plan, config.finetune, seed=seed)
    return model.eval()


def run_probes(config, seeds=(0, 1, 2), strategies=STRATEGIES, l2: float = 1e-3) -> dict:
    """Probe accuracy per layer (topic label of the target test split, probed half/half) of:
    the pretrained backbone ("pretrained": the starting point of every pretrained strategy,
    with the target head's attention direction), a random backbone ("random init": the
    starting point of scratch), and each strategy after fine-tuning. Means over seeds."""
    from . import checkpoint as C
    from .runner import ensure_pretrained, experiment_data, target_model

    if config.task.target != "topic":
        raise ValueError("the probes read the topic label: run them with task.target: topic")
    path, _ = ensure_pretrained(config, None, progress=False)
    pretrained = C.load_checkpoint(path)
    data = experiment_data(config)
    per_seed: dict[str, list[list[float]]] = {}
    finetuned = {}
    for seed in seeds:
        target = data.target(seed)
        test = target.test
        tr, te = probe_split(len(test.y), seed)
        models = {"pretrained": target_model(config, data, target.n_classes, pretrained, seed).eval(),
                  "random init": target_model(config, data, target.n_classes, pretrained, seed,
                                              random_init=True).eval()}
        for strategy in strategies:
            models[strategy] = finetuned_model(config, strategy, seed, pretrained)
        for name, model in models.items():
            per_seed.setdefault(name, []).append(probe_layers(layer_features(model, test), test.y, tr, te, l2))
        if seed == seeds[0]:
            finetuned = models
    rows = {name: {"mean": np.mean(accs, axis=0).round(4).tolist(), "std": np.std(accs, axis=0).round(4).tolist()}
            for name, accs in per_seed.items()}
    return {"seeds": list(seeds), "l2": l2, "layers": ["embedding"] + [f"block {i}" for i in range(config.model.n_layer)],
            "n_probe_train": int(len(tr)), "n_probe_test": int(len(te)), "probes": rows,
            "models": finetuned}


# ---------------------------------------------------------------------------- figures


def plot_probes(path, result: dict) -> None:
    """Probe test accuracy against layer, one line per model (run_probes' result)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result["layers"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, row in result["probes"].items():
        style = "--" if name in ("pretrained", "random init") else "-"
        ax.errorbar(range(len(layers)), row["mean"], yerr=row["std"], label=name, ls=style, marker="o", capsize=3)
    ax.axhline(1 / 4, color="grey", lw=0.8, ls=":", label="chance (4 topics)")
    ax.set_xticks(range(len(layers)), layers)
    ax.set_ylabel("probe test accuracy (topic)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Linear probes per layer (mean over seeds {', '.join(map(str, result['seeds']))})")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def attention_maps(model, idx) -> np.ndarray:
    """att (L, NH, T, T) of every block for the token ids idx (1, T), in the model's own
    attention direction (causal for the LM, both ways for the default target heads).

    The same walk as src/figures.py::attention_maps, which draws only causal models (it
    builds no mask for a bidirectional one): each block's ln_1 output goes through c_attn and
    the plain layers.attention_forward, whose cache holds att (docs/attention.md).
    """
    from .layers import attention_forward, layernorm_forward, linear_forward

    cfg, p, K = model.config, model.params, model.kernels
    allowed = attention_mask(idx.shape[1], cfg.is_causal)
    x, _ = K.embedding_forward(idx, p["wte.weight"], p["wpe.weight"])  # (1, T, C)
    maps = []
    for i in range(cfg.n_layer):
        w = model.block_params(i)
        ln1, _ = layernorm_forward(x, w["ln_1.weight"], w["ln_1.bias"])  # (1, T, C)
        qkv, _ = linear_forward(ln1, w["attn.c_attn.weight"], w["attn.c_attn.bias"])  # (1, T, 3C)
        _, (_, _, _, att, *_) = attention_forward(qkv, cfg.n_head, allowed)  # att (1, NH, T, T)
        maps.append(att[0])
        x, _ = block_forward(x, w, cfg.n_head, allowed, kernels=K)  # (1, T, C)
    return np.stack(maps)  # (L, NH, T, T)


def plot_attention(path, before, after, idx, labels=("pretrained", "after full_finetune")) -> np.ndarray:
    """Every head of every block on one sequence, before (top rows) and after fine-tuning.
    Returns the two stacks of maps, (2, L, NH, T, T)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = np.stack([attention_maps(before, idx), attention_maps(after, idx)])  # (2, L, NH, T, T)
    _, L, NH = maps.shape[:3]
    fig, axes = plt.subplots(2 * L, NH, figsize=(2.1 * NH, 2.2 * 2 * L), squeeze=False)
    for m, label in enumerate(labels):
        for i in range(L):
            for h in range(NH):
                ax = axes[m * L + i, h]
                ax.imshow(maps[m, i, h], cmap="viridis", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"{label}\nblock {i} head {h}", fontsize=7)
    fig.suptitle("Attention (rows: queries, columns: keys) on one target test sequence", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return maps


# ---------------------------------------------------------------------------- the page

TABLE_START, TABLE_END = "<!-- probes:table -->", "<!-- /probes:table -->"


def table_markdown(result: dict) -> str:
    """The page's table: one row per model, one column per layer, mean +- std over seeds."""
    head = "| model | " + " | ".join(result["layers"]) + " |"
    rule = "|---|" + "---|" * len(result["layers"])
    lines = [head, rule]
    for name, row in result["probes"].items():
        cells = [f"{m:.3f} ± {s:.3f}" for m, s in zip(row["mean"], row["std"])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_page_table(page: Path, result: dict, note: str) -> None:
    text = page.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(TABLE_START) + r".*?" + re.escape(TABLE_END), re.S)
    if not pattern.search(text):
        raise ValueError(f"{page}: no {TABLE_START} ... {TABLE_END} block to fill")
    block = f"{TABLE_START}\n{table_markdown(result)}\n\n{note}\n{TABLE_END}"
    page.write_text(pattern.sub(lambda _: block, text), encoding="utf-8")


def main(config_path=None, seeds=(0, 1, 2)) -> dict:
    """Regenerate docs/probes.md's table, docs/figures/probes.json, probes.png and
    attention_finetuned.png from config.yaml (the pretrained model is cached in cache/)."""
    from .config import config_hash, load_config, replace_in
    from .runner import task_spec
    from .tasks import make_target

    config_path = Path(config_path or ROOT / "config.yaml")
    config = load_config(config_path, env=False)
    config = replace_in(config, "runner.cache_dir", str(ROOT / config.runner.cache_dir))
    result = run_probes(config, seeds=seeds)
    models = result.pop("models")
    figures = ROOT / "docs" / "figures"
    c = config.to_dict()
    used = {"config": config_path.name, "config_hash": config_hash(c)[:12],
            "model": c["model"], "pretrain_steps": c["pretrain"]["steps"], "finetune": c["finetune"]}
    plot_probes(figures / "probes.png", result)
    test = make_target("topic", task_spec(config), seed=seeds[0]).test
    row = int(np.argmax(test.mask.sum(axis=1)))  # the longest test sequence, no padding to draw
    idx = test.x[row][test.mask[row]][None]  # (1, T)
    maps = plot_attention(figures / "attention_finetuned.png", models["pretrained"], models["full_finetune"], idx)
    # how far each block's attention rows moved: total variation distance, mean over heads and rows
    result["attention_tv_per_block"] = (np.abs(maps[1] - maps[0]).sum(-1) / 2).mean(axis=(1, 2)).round(4).tolist()
    note = (f"Made by `PYTHONPATH=src python -m transferlab.probes` (repository root) from `{config_path.name}` "
            f"(config hash {used['config_hash']}: {c['model']['n_layer']} blocks, C = {c['model']['n_embd']}, "
            f"{c['pretrain']['steps']} pretraining steps, {c['finetune']['steps']} fine-tuning steps); "
            f"seeds {', '.join(map(str, seeds))}; probes trained on {result['n_probe_train']} and tested on "
            f"{result['n_probe_test']} target test sequences; attention moved by a total variation of "
            f"{', '.join(f'{v:.3f}' for v in result['attention_tv_per_block'])} per row (blocks 0..L-1) "
            f"under full_finetune, seed {seeds[0]}; the same numbers are in "
            f"[figures/probes.json](figures/probes.json).")
    (figures / "probes.json").write_text(json.dumps({**result, "used": used}, indent=1) + "\n", encoding="utf-8")
    write_page_table(ROOT / "docs" / "probes.md", result, note)
    print(table_markdown(result))
    return result


if __name__ == "__main__":
    main()
