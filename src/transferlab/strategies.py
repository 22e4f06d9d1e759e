"""Transfer strategies as declarative plans: what is trainable when, at which rate.

A plan is data, not a branch in the training loop. It lists phases; each phase says, from
its first step on, which parameters train (a trainable *spec*, turned into masks by
`apply_phase`) and the learning-rate multiplier of each layer group, bottom to top:
group 0 the embeddings, 1..L the blocks, L + 1 ln_f and the head (see masks.py).

    plan = build_plan("gradual_unfreeze", steps=300, n_layer=2, knobs=config.strategies)
    print(describe(plan, 300))  # 300: the total steps, to print where each phase ends

Trainable specs: "all", "head" (the head only: the backbone is frozen), "bias" (BitFit),
"sparse" (a Fisher top-k mask plus the head), "lora" (LoRA adapters plus the head), "top:K"
(the top K layer groups).
One page per strategy in docs/strategies/.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from . import masks as M
from .schedules import discriminative_scales

SPECS = ("all", "head", "bias", "sparse", "lora")


@dataclass(frozen=True)
class Phase:
    start: int  # first training step of the phase
    trainable: str  # a trainable spec, see the module docstring
    lr_scales: tuple = ()  # per layer group, bottom to top; () = every group at 1.0


@dataclass(frozen=True)
class Plan:
    name: str
    pretrained: bool  # start from the pretrained backbone (False: random init)
    phases: tuple
    schedule: str | None = None  # schedules.make_schedule name; None = the configured one
    schedule_kwargs: dict = field(default_factory=dict)
    feature_cache: bool = False  # backbone frozen throughout: compute its output once
    keep_fraction: float | None = None  # "sparse" phases: the fraction of weights that train
    fisher_batches: int | None = None  # "sparse" phases: batches for the Fisher estimate
    lora: dict | None = None  # "lora" phases: the adapters to attach first (lora.attach's knobs)
    aux_lm_weight: float = 0.0  # GPT-1: add this x the LM loss on the same batch (train.auxiliary_lm)
    lm_stage_steps: int = 0  # ULMFiT: first fine-tune the LM on the target's own text this long

    def phase_at(self, step: int) -> Phase:
        current = self.phases[0]
        for phase in self.phases:
            if phase.start <= step:
                current = phase
        return current


# name -> (one-line summary, reference)
STRATEGIES = {
    "scratch": ("random init, everything trains: the baseline transfer must beat", "-"),
    "feature_extractor": ("pretrained backbone frozen, only the new head trains (on cached features)",
                          "Keras `trainable = False`; Yosinski et al. 2014"),
    "head_finetune": ("everything trains, the backbone at a reduced rate", "common practice (HF, timm)"),
    "full_finetune": ("everything trains at one rate", "Howard & Ruder 2018 baseline; GPT-1 fine-tuning"),
    "gradual_unfreeze": ("unfreeze one layer group per phase from the top, discriminative rates",
                         "ULMFiT, arXiv 1801.06146, sec. 3.3"),
    "discriminative_lr": ("rate / 2.6 per group going down, slanted triangular schedule",
                          "ULMFiT, arXiv 1801.06146, eq. 2-3"),
    "freeze_then_unfreeze": ("frozen backbone until an iteration, then unfrozen at a lower rate",
                             "dynamic unfreezing (nanoGPT-derived transfer plans)"),
    "bitfit": ("only biases (and the head) train", "BitFit, arXiv 2106.10199"),
    "sparse_mask": ("only the top-k% weights by Fisher information (and the head) train",
                    "FISH mask, arXiv 2111.09839"),
    "lora": ("frozen weights, trainable low-rank adapters on the chosen modules (and the head)",
             "LoRA, arXiv 2106.09685; PEFT's LoraConfig"),
    "ulmfit": ("LM fine-tuning on the target's unlabelled text, then gradual unfreezing",
               "ULMFiT, arXiv 1801.06146, sec. 3.2-3.3"),
    "aux_lm": ("everything trains on the task loss plus lambda x the LM loss of the same batch",
               "GPT-1 (Radford et al. 2018), eq. 3"),
}


def build_plan(name: str, steps: int, n_layer: int, knobs) -> Plan:
    """The plan of a named strategy; `knobs` is the config's `strategies` section."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    n_groups = n_layer + 2
    if name == "scratch":
        return Plan(name, pretrained=False, phases=(Phase(0, "all"),))
    if name == "feature_extractor":
        return Plan(name, True, (Phase(0, "head"),), feature_cache=True)
    if name == "head_finetune":
        k = knobs.head_finetune.backbone_lr_multiplier
        return Plan(name, True, (Phase(0, "all", (k,) * (n_groups - 1) + (1.0,)),))
    if name == "full_finetune":
        return Plan(name, True, (Phase(0, "all"),))
    if name == "gradual_unfreeze":
        g = knobs.gradual_unfreeze
        n_phases = g.phases or n_groups
        scales = tuple(discriminative_scales(n_groups, g.decay))
        per = max(1, steps // n_phases)
        # phase k trains the top k + 1 groups; the last phase reaches every group
        tops = np.linspace(1, n_groups, n_phases).round().astype(int)
        phases = tuple(Phase(k * per, f"top:{top}", scales) for k, top in enumerate(tops))
        return Plan(name, True, phases, "slanted_triangular")
    if name == "discriminative_lr":
        d = knobs.discriminative_lr
        return Plan(name, True, (Phase(0, "all", tuple(discriminative_scales(n_groups, d.decay))),),
                    "slanted_triangular", {"cut_frac": d.cut_frac, "ratio": d.ratio})
    if name == "freeze_then_unfreeze":
        f = knobs.freeze_then_unfreeze
        head = f.head_lr_multiplier
        frozen = Phase(0, "head", (0.0,) * (n_groups - 1) + (head,))
        if f.unfreeze_at_iteration >= steps:
            return Plan(name, True, (frozen,))
        thawed = Phase(f.unfreeze_at_iteration, "all", (f.unfreeze_lr_multiplier,) * (n_groups - 1) + (head,))
        return Plan(name, True, (frozen, thawed))
    if name == "bitfit":
        return Plan(name, True, (Phase(0, "bias"),))
    if name == "ulmfit":
        u = knobs.ulmfit
        return dataclasses.replace(build_plan("gradual_unfreeze", steps, n_layer, knobs), name=name,
                                   lm_stage_steps=u.lm_steps)
    if name == "aux_lm":
        return Plan(name, True, (Phase(0, "all"),), aux_lm_weight=knobs.aux_lm.weight)
    if name == "lora":
        k = knobs.lora
        return Plan(name, True, (Phase(0, "lora"),),
                    lora={"r": k.r, "alpha": k.alpha, "dropout": k.dropout, "targets": tuple(k.targets)})
    sparse = knobs.sparse_mask
    return Plan(name, True, (Phase(0, "sparse"),), keep_fraction=sparse.keep_fraction,
                fisher_batches=sparse.fisher_batches)


def apply_phase(model, phase: Phase, layernorm_trainable=False, fisher_batches=None, keep_fraction=None) -> dict:
    """Set model.masks for the phase; return the optimizer's per-parameter lr_scale."""
    spec, L = phase.trainable, model.config.n_layer
    if spec == "all":
        M.unfreeze_all(model)
    elif spec == "head":
        M.freeze_backbone(model, layernorm_trainable)
    elif spec == "bias":
        M.bias_only(model)
    elif spec == "lora":
        M.adapters_only(model)
    elif spec == "sparse":
        M.fisher_mask(model, fisher_batches, keep_fraction)
    elif spec.startswith("top:"):
        M.freeze_to(model, L + 2 - int(spec[4:]), layernorm_trainable)
    else:
        raise ValueError(f"unknown trainable spec {spec!r}; known: {SPECS} or 'top:K'")
    if not phase.lr_scales:
        return {}
    return {name: float(phase.lr_scales[M.group_of(name, L)]) for name in model.params}


def describe(plan: Plan, total_steps: int) -> str:
    """A small table of the plan's phases, for logs and docs."""
    summary = STRATEGIES[plan.name][0] if plan.name in STRATEGIES else "a plan of your own"
    lines = [f"{plan.name}: {summary}",
             f"  start from: {'pretrained backbone' if plan.pretrained else 'random init'}; "
             f"schedule: {plan.schedule or 'configured (finetune.schedule)'}" + ("; feature cache" if plan.feature_cache else "")]
    for i, phase in enumerate(plan.phases):
        end = plan.phases[i + 1].start if i + 1 < len(plan.phases) else total_steps
        scales = ", ".join(f"{s:.3g}" for s in phase.lr_scales) if phase.lr_scales else "all 1"
        lines.append(f"  steps {phase.start:>4}-{end - 1:<4} train {phase.trainable:<5} lr x [{scales}]")
    return "\n".join(lines)
