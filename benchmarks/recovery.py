"""How much of the pruning gap each PEFT method gives back, at the same data and optimiser steps.

One pruned model (SmolLM2-135M, Wanda 50% by default), one calibration, then for every method a drop-in swap of
the PEFT config: the same data and loss (by default distillation from the dense model on LAMBADA text: KL of the
pruned model's next-token distribution to the dense one), the same number of optimiser steps, batch and seeds. Every row is
evaluated on the paper's seven tasks (the first ``--limit`` items of each) and on held-out LAMBADA perplexity,
and merged (on a copy) to measure the sparsity that survives.

    python benchmarks/recovery.py                       # the committed run (see README for its settings/time)
    python benchmarks/recovery.py --steps 10 --limit 20 --seeds 0 --methods restorelcc,lora   # a quick look

Writes benchmarks/results/recovery.json (rows: dense, pruned, then one per method, seeds aggregated as mean and
spread), recovery.md (a table) and recovery.png (gap recovered against trainable parameters, log scale). The
results file is rewritten after every finished run, so an interrupted benchmark keeps what it measured, and a
rerun with the same measurement settings keeps those runs. Shards run in parallel (other machines, other cores, each
with its own ``--output``) are merged with ``--resume-from SHARD/recovery.json``: their runs are kept, not redone.
With ``--merge-only`` (and the shards' measurement flags) a merge runs nothing and loads no model: seconds, anywhere.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import torch
from peft import BeftConfig, IA3Config, LNTuningConfig, LoraConfig, PeftModel, get_peft_model
from tqdm import tqdm

from peft_restorelcc import recovery
from peft_restorelcc.assets import default_device, load_model, load_tokenizer
from peft_restorelcc.calibration import LostComponents, build_restorelcc_model, score_heads, select_heads
from peft_restorelcc.data import (
    EVALUATED_ITEMS,
    SCIENCE_SOURCES,
    WIDE_TRAINING_SOURCES,
    cloze_examples,
    in_task_examples,
    instruction_and_cloze_examples,
    instruction_examples,
    shuffled,
)
from peft_restorelcc.evaluation import chance_accuracy, task_size
from peft_restorelcc.pruning import (
    hold_pruned_weights_at_zero,
    load_report,
    measure_sparsity,
    resolve_sparsity,
    save_pruned,
)
from peft_restorelcc.training import (
    PaddingCollator,
    build_train_dataset,
    instruction_records,
    pad_token_id_of,
    train_adapter,
)

RESULTS = Path(__file__).parent / "results"
GOAL_SHARE = 0.9  # the goal: the best variant recovers 90% of the accuracy gap or more

# Learning rates, one per family (the defaults of --vector-lr and --matrix-lr): the paper trains RestoreLCC at 1e-3
# for ~750 steps; this budget is several times smaller, so the vector-sized methods (RestoreLCC, biases, IA3, LN)
# get 1e-2 and the matrix-sized ones (LoRA, DoRA) 5e-4.
VECTOR_LR, MATRIX_LR = "vector", "matrix"
DEFAULT_LEARNING_RATES = {VECTOR_LR: 1e-2, MATRIX_LR: 5e-4}

# Pairs from the evaluation tasks' own items after the first data.EVALUATED_ITEMS (data.in_task_examples): what
# in-task training data is worth, which the package otherwise lacks. Only with --limit <= EVALUATED_ITEMS.
IN_TASK_DATA = "instruction-in-task"
# The same items in the form lm-eval scores them (the task's own prompt, then the answer, no options shown).
CLOZE_IN_TASK_DATA = "cloze-in-task"
IN_TASK_FORM = {IN_TASK_DATA: "options", CLOZE_IN_TASK_DATA: "cloze"}
# The recipe's pairs (which lift ARC-c, a task with no in-task items) and the cloze in-task pairs (which lift
# HellaSwag) together, shuffled into one set.
MIXED_IN_TASK_DATA = "instruction-and-cloze-in-task"
# Neither mix lifts ARC-Challenge or OpenBookQA: each with MMLU's school science (1,408 pairs) added in the cloze form,
# the package's nearest data to those two tasks. Same steps, so a run reads about 6,000 of the 7,000 pairs once.
SCIENCE = "-mmlu-science"
MIXED_IN_TASK_SCIENCE_DATA = MIXED_IN_TASK_DATA + SCIENCE
IN_TASK_DATA_CHOICES = (*IN_TASK_FORM, MIXED_IN_TASK_DATA, MIXED_IN_TASK_SCIENCE_DATA)
# The mix with its in-task half swapped for as many cloze pairs from sets no task evaluates (PIQA and SciQ, 2,572
# against 2,672): does the mix's gain need the tasks' own items, or only pairs in the form they are scored in?
MIXED_EXTRA_DATA = "instruction-and-cloze-piqa-sciq"
MIXED_EXTRA_SCIENCE_DATA = MIXED_EXTRA_DATA + SCIENCE
# Every pair of the five sets no task evaluates in the cloze form, none with options: are the recipe's options pairs
# needed at all?
CLOZE_WIDE_DATA = "cloze-wide"
# HellaSwag's four endings make long prompts (up to 266 tokens with the answer and EOS, docs/data.md): at 320 none
# is cut.
IN_TASK_SEQ_LEN = 320


class Context:
    """What every method shares: the pruned model, its lost components (scored), tokenizer and settings."""

    def __init__(self, pruned, components, tokenizer, args):
        self.pruned, self.components, self.tokenizer, self.args = pruned, components, tokenizer, args
        self.device = default_device(args.device)
        self.teacher = None  # the dense model, when the methods are trained by distillation
        self.pruned_fingerprint: str | None = None  # weights_fingerprint of the pruned model

    def fresh_pruned(self):
        return copy.deepcopy(self.pruned)

    def restorelcc(self, heads: float | None = None, components=None, **kwargs):
        return build_restorelcc_model(
            self.fresh_pruned(), components or self.components, num_heads=heads or self.args.heads, **kwargs
        )

    def total_heads(self) -> int:
        return self.components.num_heads

    def ffn_bias_layers(self) -> list[int]:
        """As many FFN output biases (hidden_size each) as the parameter budget of RestoreLCC at --heads."""
        head_dim = self.components.head_dim
        budget = round(self.args.heads * self.total_heads()) * 2 * head_dim
        hidden = self.pruned.config.hidden_size
        num_layers = self.pruned.config.num_hidden_layers
        count = max(1, min(num_layers, round(budget / hidden)))
        return [round(i * (num_layers - 1) / max(1, count - 1)) for i in range(count)] if count > 1 else [0]


def _restorelcc_paper(context: Context):
    return context.restorelcc(init="paper")


def _restorelcc_on_share(heads: float) -> Callable[[Context], Any]:
    """RestoreLCC (paper init) on another share of the heads than the benchmark's --heads."""
    return lambda context: context.restorelcc(heads=heads, init="paper")


_restorelcc_on_half_the_heads = _restorelcc_on_share(0.5)


def _lora_all_linear(context: Context):
    return get_peft_model(context.fresh_pruned(), LoraConfig(r=8, target_modules="all-linear"))


def _ia3(context: Context):
    return get_peft_model(context.fresh_pruned(), IA3Config(task_type="CAUSAL_LM"))


def _sparse_finetuning(context: Context):
    """Every weight of the pruned model trained, the pruned ones held at zero. Not a PEFT method (on SmolLM2-135M it
    trains 55 times LoRA's parameters and saves a whole model) but the ceiling the others are held against: how much
    of the gap the same data and steps give back at all."""
    model = context.fresh_pruned()
    model.requires_grad_(True)
    hold_pruned_weights_at_zero(model)
    return model


# RestoreLCC rows whose heads are chosen otherwise than as the calibration's probe ranks them: (scoring strategy,
# selection seed, selection of select_heads). A random draw keeps its selection seed whatever the training seed: rows
# of several draws tell how much the choice of heads moves the result, seeds of one draw how much the training does.
# The "per-layer" rows keep the probe's scores but spread the heads evenly over the layers, as `restorelcc run
# --selection per-layer` does (random draws, which do, beat the probe's own choice under distillation).
HEAD_SELECTIONS: dict[str, tuple[str, int, str]] = {
    "restorelcc-lost_norm": ("lost_norm", 0, "top"),
    "restorelcc-random": ("random", 0, "top"),
    "restorelcc-random-draw1": ("random", 1, "top"),
    "restorelcc-random-draw2": ("random", 2, "top"),
    "restorelcc-per-layer": ("probe", 0, "per-layer"),
    "restorelcc-instruction-per-layer": ("probe", 0, "per-layer"),
    "restorelcc-instruction-random": ("random", 0, "top"),
}


def reselected(components: LostComponents, name: str) -> LostComponents:
    """``components`` scored the way row ``name`` of :data:`HEAD_SELECTIONS` ranks its heads."""
    strategy, seed, _ = HEAD_SELECTIONS[name]
    if strategy == "probe":
        return components
    return score_heads(components, strategy, seed=seed)


# The RestoreLCC rows on the probe's top heads at --heads that the other head selections are compared with, one per
# recipe those are run on.
PROBE_TOP_ROWS = ("restorelcc", "restorelcc-instruction")


def chosen_heads(components: LostComponents, name: str, heads: float) -> dict[int, list[int]]:
    """The heads row ``name`` (of :data:`PROBE_TOP_ROWS` or :data:`HEAD_SELECTIONS`) compensates at ``heads``."""
    if name in PROBE_TOP_ROWS:
        return select_heads(components, heads)
    return select_heads(reselected(components, name), heads, HEAD_SELECTIONS[name][2])


def _reselected(name: str) -> Callable[[Context], Any]:
    selection = HEAD_SELECTIONS[name][2]
    return lambda c: c.restorelcc(init="paper", components=reselected(c.components, name), selection=selection)


# name -> (builder(context) -> PeftModel, learning rate, trained?)
METHODS: dict[str, tuple[Callable[[Context], Any], float, bool]] = {
    "restorelcc": (_restorelcc_paper, VECTOR_LR, True),
    "restorelcc-lost": (lambda c: c.restorelcc(init="lost"), VECTOR_LR, True),
    "restorelcc-free": (lambda c: c.restorelcc(init="lost"), VECTOR_LR, False),
    "head-bias": (lambda c: c.restorelcc(init="paper", use_components=False), VECTOR_LR, True),
    "lora": (_lora_all_linear, MATRIX_LR, True),
    "lora-oproj": (
        lambda c: get_peft_model(c.fresh_pruned(), LoraConfig(r=8, target_modules=["o_proj"])),
        MATRIX_LR,
        True,
    ),
    "dora": (
        lambda c: get_peft_model(c.fresh_pruned(), LoraConfig(r=8, target_modules="all-linear", use_dora=True)),
        MATRIX_LR,
        True,
    ),
    "ia3": (_ia3, VECTOR_LR, True),
    "ln-tuning": (lambda c: get_peft_model(c.fresh_pruned(), LNTuningConfig(task_type="CAUSAL_LM")), VECTOR_LR, True),
    # The paper's claims at small scale.
    "ffn-bias": (
        lambda c: get_peft_model(
            c.fresh_pruned(),
            BeftConfig(target_modules=rf"model\.layers\.({'|'.join(map(str, c.ffn_bias_layers()))})\.mlp\.down_proj"),
        ),
        VECTOR_LR,
        True,
    ),
    "restorelcc-heads-5%": (_restorelcc_on_share(0.05), VECTOR_LR, True),
    "restorelcc-heads-12.5%": (_restorelcc_on_share(0.125), VECTOR_LR, True),
    "restorelcc-heads-50%": (_restorelcc_on_half_the_heads, VECTOR_LR, True),
    **{name: (_reselected(name), VECTOR_LR, True) for name in HEAD_SELECTIONS},
    # The paper's own recipe (instruction data, LM loss on the answer) against the benchmark's --data/--distill-alpha.
    "restorelcc-instruction": (_restorelcc_paper, VECTOR_LR, True),
    "restorelcc-instruction-lr1e-2": (_restorelcc_paper, VECTOR_LR, True),
    "restorelcc-instruction-lr3e-4": (_restorelcc_paper, VECTOR_LR, True),
    "restorelcc-instruction-distill": (_restorelcc_paper, VECTOR_LR, True),
    "restorelcc-instruction-heads-50%": (_restorelcc_on_half_the_heads, VECTOR_LR, True),
    "restorelcc-instruction-heads-70%": (_restorelcc_on_share(0.7), VECTOR_LR, True),
    "lora-instruction": (_lora_all_linear, MATRIX_LR, True),
    "lora-instruction-distill": (_lora_all_linear, MATRIX_LR, True),
    "sparse-ft-instruction": (_sparse_finetuning, MATRIX_LR, True),
    "sparse-ft-instruction-lr1e-5": (_sparse_finetuning, MATRIX_LR, True),
    "sparse-ft-instruction-lr2e-4": (_sparse_finetuning, MATRIX_LR, True),
    "restorelcc-instruction-wide": (_restorelcc_paper, VECTOR_LR, True),
    "sparse-ft-instruction-wide": (_sparse_finetuning, MATRIX_LR, True),
    "restorelcc-instruction-in-task": (_restorelcc_paper, VECTOR_LR, True),
    "sparse-ft-instruction-in-task": (_sparse_finetuning, MATRIX_LR, True),
    "restorelcc-cloze-in-task": (_restorelcc_paper, VECTOR_LR, True),
    "sparse-ft-cloze-in-task": (_sparse_finetuning, MATRIX_LR, True),
    "restorelcc-instruction-and-cloze-in-task": (_restorelcc_paper, VECTOR_LR, True),
    "sparse-ft-instruction-and-cloze-in-task": (_sparse_finetuning, MATRIX_LR, True),
    "restorelcc-instruction-and-cloze-piqa-sciq": (_restorelcc_paper, VECTOR_LR, True),
    "restorelcc-cloze-wide": (_restorelcc_paper, VECTOR_LR, True),
    "restorelcc-instruction-and-cloze-in-task-heads-50%": (_restorelcc_on_half_the_heads, VECTOR_LR, True),
    "restorelcc-instruction-and-cloze-piqa-sciq-heads-50%": (_restorelcc_on_half_the_heads, VECTOR_LR, True),
    "restorelcc-instruction-and-cloze-in-task-mmlu-science": (_restorelcc_paper, VECTOR_LR, True),
    "restorelcc-instruction-and-cloze-piqa-sciq-mmlu-science": (_restorelcc_paper, VECTOR_LR, True),
    # IA3 also keeps sparsity after merge; the strongest such method under distillation.
    "ia3-instruction": (_ia3, VECTOR_LR, True),
    "ia3-instruction-lr1e-3": (_ia3, VECTOR_LR, True),
}
# Methods trained on other data, with another loss or learning rate than the benchmark's flags give them.
PAPER_RECIPE = {"data": "instruction", "distill_alpha": 0.0}
# The paper's lr for RestoreLCC; on the default job 1e-2 doubled held-out perplexity for no accuracy.
RESTORELCC_LR = {"learning_rate": 1e-3}
# Both recipes at once: the LM loss on the answers (accuracy) plus KL to the dense model on the same positions
# (the paper's recipe alone raised held-out perplexity above the pruned model's, distillation lowered it).
BOTH_RECIPES = PAPER_RECIPE | {"distill_alpha": 0.5}
RECIPE_OVERRIDES: dict[str, dict[str, Any]] = {
    "restorelcc-instruction": PAPER_RECIPE | RESTORELCC_LR,
    "restorelcc-instruction-lr1e-2": PAPER_RECIPE | {"learning_rate": 1e-2},
    # At 750 steps the paper's rate lifts perplexity further than at 200 and gives back less: is it overtraining?
    "restorelcc-instruction-lr3e-4": PAPER_RECIPE | {"learning_rate": 3e-4},
    # The probe's heads spread over the layers (restorelcc run --selection per-layer), and random heads (draw 0),
    # on the paper's recipe.
    "restorelcc-instruction-per-layer": PAPER_RECIPE | RESTORELCC_LR,
    "restorelcc-instruction-random": PAPER_RECIPE | RESTORELCC_LR,
    "restorelcc-instruction-distill": BOTH_RECIPES | RESTORELCC_LR,
    # Twice the heads (17,280 parameters, still under 1% of LoRA's): whether capacity limits the paper's recipe.
    "restorelcc-instruction-heads-50%": PAPER_RECIPE | RESTORELCC_LR,
    # The most heads within the goal's budget: 189 of 270 (24,192 parameters, 0.99% of LoRA's 2,442,240).
    "restorelcc-instruction-heads-70%": PAPER_RECIPE | RESTORELCC_LR,
    "lora-instruction": PAPER_RECIPE,
    "lora-instruction-distill": BOTH_RECIPES,
    # Full fine-tuning at a full fine-tuning's rates: LoRA's 5e-4 would move every weight too far.
    "sparse-ft-instruction": PAPER_RECIPE | {"learning_rate": 5e-5},
    "sparse-ft-instruction-lr1e-5": PAPER_RECIPE | {"learning_rate": 1e-5},
    "sparse-ft-instruction-lr2e-4": PAPER_RECIPE | {"learning_rate": 2e-4},
    # Is the recipe's data the limit? The same recipe on 1.9 times the distinct pairs (PIQA and SciQ too): at 750
    # steps each pair is seen about once instead of twice.
    "restorelcc-instruction-wide": PAPER_RECIPE | RESTORELCC_LR | {"data": "instruction-wide"},
    "sparse-ft-instruction-wide": PAPER_RECIPE | {"learning_rate": 5e-5, "data": "instruction-wide"},
    # Is it the kind of data? About as many pairs as the recipe's (2,672 against 2,941), from HellaSwag, ARC-Easy
    # and OpenBookQA themselves.
    "restorelcc-instruction-in-task": PAPER_RECIPE | RESTORELCC_LR | {"data": IN_TASK_DATA},
    "sparse-ft-instruction-in-task": PAPER_RECIPE | {"learning_rate": 5e-5, "data": IN_TASK_DATA},
    # Or the form? The same items as lm-eval scores them: trained on the likelihood the evaluation compares.
    "restorelcc-cloze-in-task": PAPER_RECIPE | RESTORELCC_LR | {"data": CLOZE_IN_TASK_DATA},
    "sparse-ft-cloze-in-task": PAPER_RECIPE | {"learning_rate": 5e-5, "data": CLOZE_IN_TASK_DATA},
    # Both kinds at once: does each keep what it gave back on its own tasks?
    "restorelcc-instruction-and-cloze-in-task": PAPER_RECIPE | RESTORELCC_LR | {"data": MIXED_IN_TASK_DATA},
    "sparse-ft-instruction-and-cloze-in-task": PAPER_RECIPE | {"learning_rate": 5e-5, "data": MIXED_IN_TASK_DATA},
    "restorelcc-instruction-and-cloze-piqa-sciq": PAPER_RECIPE | RESTORELCC_LR | {"data": MIXED_EXTRA_DATA},
    "restorelcc-cloze-wide": PAPER_RECIPE | RESTORELCC_LR | {"data": CLOZE_WIDE_DATA},
    # The two mixes on twice the heads (17,280 parameters, 0.71% of LoRA's): the best data with more capacity.
    "restorelcc-instruction-and-cloze-in-task-heads-50%": PAPER_RECIPE | RESTORELCC_LR | {"data": MIXED_IN_TASK_DATA},
    "restorelcc-instruction-and-cloze-piqa-sciq-heads-50%": PAPER_RECIPE | RESTORELCC_LR | {"data": MIXED_EXTRA_DATA},
    # Each mix with MMLU's school science added.
    "restorelcc-instruction-and-cloze-in-task-mmlu-science": (
        PAPER_RECIPE | RESTORELCC_LR | {"data": MIXED_IN_TASK_SCIENCE_DATA}
    ),
    "restorelcc-instruction-and-cloze-piqa-sciq-mmlu-science": (
        PAPER_RECIPE | RESTORELCC_LR | {"data": MIXED_EXTRA_SCIENCE_DATA}
    ),
    "ia3-instruction": PAPER_RECIPE,
    # RestoreLCC's rate on this recipe: at 1e-2 RestoreLCC's perplexity doubled, so IA3's may suffer the same way.
    "ia3-instruction-lr1e-3": PAPER_RECIPE | RESTORELCC_LR,
}
MAIN_METHODS = [
    "restorelcc",
    "restorelcc-lost",
    "restorelcc-free",
    "head-bias",
    "lora",
    "lora-oproj",
    "dora",
    "ia3",
    "ln-tuning",
]
CLAIM_METHODS = [
    "ffn-bias",
    "restorelcc-heads-5%",
    "restorelcc-heads-12.5%",
    "restorelcc-heads-50%",
    "restorelcc-lost_norm",
    "restorelcc-random",
    "restorelcc-random-draw1",
    "restorelcc-random-draw2",
    "restorelcc-per-layer",
    "restorelcc-instruction",
    "restorelcc-instruction-lr1e-2",
    "restorelcc-instruction-lr3e-4",
    "restorelcc-instruction-per-layer",
    "restorelcc-instruction-random",
    "restorelcc-instruction-distill",
    "restorelcc-instruction-heads-50%",
    "restorelcc-instruction-heads-70%",
    "lora-instruction",
    "lora-instruction-distill",
    "ia3-instruction",
    "ia3-instruction-lr1e-3",
    "sparse-ft-instruction",
    "sparse-ft-instruction-lr1e-5",
    "sparse-ft-instruction-lr2e-4",
    "restorelcc-instruction-wide",
    "sparse-ft-instruction-wide",
    "restorelcc-instruction-in-task",
    "sparse-ft-instruction-in-task",
    "restorelcc-cloze-in-task",
    "sparse-ft-cloze-in-task",
    "restorelcc-instruction-and-cloze-in-task",
    "sparse-ft-instruction-and-cloze-in-task",
    "restorelcc-instruction-and-cloze-piqa-sciq",
    "restorelcc-cloze-wide",
    "restorelcc-instruction-and-cloze-in-task-heads-50%",
    "restorelcc-instruction-and-cloze-piqa-sciq-heads-50%",
    "restorelcc-instruction-and-cloze-in-task-mmlu-science",
    "restorelcc-instruction-and-cloze-piqa-sciq-mmlu-science",
]


def recipe_of(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """How a method is trained under the benchmark's settings: data, distillation weight and learning rate."""
    default_lr = settings["vector_lr"] if METHODS[name][1] == VECTOR_LR else settings["matrix_lr"]
    return {"data": settings["data"], "distill_alpha": settings["distill_alpha"], "learning_rate": default_lr} | (
        RECIPE_OVERRIDES.get(name, {})
    )


def trained_as_now(name: str, run: dict[str, Any], settings: dict[str, Any]) -> bool:
    """Whether an earlier run was trained the way these settings would train it (untrained rows always are; runs of
    a row the benchmark no longer defines are not: a merge drops a retired row instead of keeping it unexplained)."""
    if name not in METHODS:
        return False
    if not METHODS[name][2]:
        return True
    if "learning_rate" not in run:  # written before runs recorded their recipe: the file's settings were it
        return name not in RECIPE_OVERRIDES
    recipe = recipe_of(name, settings)
    # A run records the weight of the KL term only when a teacher took part.
    return (run.get("data"), run.get("distill_alpha"), run.get("learning_rate")) == (
        recipe["data"],
        recipe["distill_alpha"] or None,
        recipe["learning_rate"],
    )


def training_dataset(data: str, tokenizer, samples: int, seed: int) -> datasets.Dataset:
    """The training sequences of a recipe's data: ``build_train_dataset``'s, the in-task pairs in one form, the
    recipe's pairs and cloze pairs (the in-task ones, or PIQA's and SciQ's; either with MMLU's school science)
    shuffled together, or the five sets no task evaluates in the cloze form alone."""
    if data not in (*IN_TASK_DATA_CHOICES, MIXED_EXTRA_DATA, MIXED_EXTRA_SCIENCE_DATA, CLOZE_WIDE_DATA):
        return build_train_dataset(data, tokenizer, samples=samples, seed=seed)
    science = cloze_examples("train", seed=seed, sources=SCIENCE_SOURCES) if data.endswith(SCIENCE) else []
    if data == CLOZE_WIDE_DATA:
        examples = cloze_examples("train", limit=samples, seed=seed, sources=WIDE_TRAINING_SOURCES)
    elif data == MIXED_EXTRA_DATA:  # --data instruction-and-cloze of train and run, at the in-task rows' length
        examples = instruction_and_cloze_examples("train", limit=samples, seed=seed)
    elif data == MIXED_EXTRA_SCIENCE_DATA:
        examples = shuffled(instruction_and_cloze_examples("train", seed=seed) + science, seed, samples)
    elif data in (MIXED_IN_TASK_DATA, MIXED_IN_TASK_SCIENCE_DATA):
        cloze = in_task_examples("train", seed=seed, form=IN_TASK_FORM[CLOZE_IN_TASK_DATA])
        examples = instruction_examples("train", seed=seed) + cloze + science
        examples = shuffled(examples, seed, samples)
    else:
        examples = in_task_examples("train", limit=samples, seed=seed, form=IN_TASK_FORM[data])
    return datasets.Dataset.from_list(instruction_records(examples, tokenizer, IN_TASK_SEQ_LEN))


def evaluate(model, context: Context) -> dict[str, Any]:
    args = context.args
    return recovery.evaluate_model(
        model,
        context.tokenizer,
        limit=args.limit,
        perplexity_passages=args.perplexity_passages,
        batch_size=args.eval_batch_size,
        per_item=True,  # every row keeps its items, for paired errors (item_noise)
    )


def accuracy_of(results: dict[str, Any]) -> dict[str, float]:
    return {
        task: metrics[recovery.headline_metric(metrics)]
        for task, metrics in results["tasks"].items()
    }


def headline_item_scores(results: dict[str, Any]) -> dict[str, str]:
    """Each task's per-item scores of the headline metric, as the results file keeps them ("0110...")."""
    return {
        task: results["items"][task][recovery.headline_metric(metrics)]
        for task, metrics in results["tasks"].items()
    }


def item_noise(
    dense: dict[str, Any], pruned: dict[str, Any], run: dict[str, Any], tasks: list[str] | None = None
) -> float | None:
    """The paired standard error, over items, of a run's share of the accuracy gap over ``tasks`` (all when None;
    None where a row was measured before runs kept their items)."""
    if not all("items" in row for row in (dense, pruned, run)) or tasks == []:
        return None
    return recovery.gap_recovered_stderr(*(decoded_items(row, tasks) for row in (dense, pruned, run)))


def decoded_items(row: dict[str, Any], tasks: list[str] | None = None) -> dict[str, Any]:
    """A row's (or run's) kept per-item scores as arrays, for ``tasks`` (all when None)."""
    return {task: recovery.item_scores(scores) for task, scores in row["items"].items() if tasks is None or task in tasks}


def above_chance(dense: dict[str, Any], limit: int | None) -> dict[str, Any]:
    """The tasks the dense model scores above chance on (``recovery.tasks_above_chance``), with each task's chance
    accuracy on the items measured: the share of the gap over them is the one a model at chance cannot blur."""
    item_counts = {
        task: len(dense["items"][task]) if "items" in dense else min(limit or math.inf, task_size(task))
        for task in dense["tasks"]
    }
    # Chance on exactly the items counted, as `restorelcc run` computes it.
    chance = {task: chance_accuracy(task, count) for task, count in item_counts.items()}
    return {
        "tasks": recovery.tasks_above_chance(dense["tasks"], chance, item_counts),
        "chance": chance,
        "z": recovery.ABOVE_CHANCE_Z,
    }


def run_method(name: str, seed: int, context: Context, output: Path) -> dict[str, Any]:
    build, _, trained = METHODS[name]
    torch.manual_seed(seed)
    model = build(context)
    trainable = recovery.trainable_parameters(model)
    args = context.args
    recipe = recipe_of(name, vars(args))
    learning_rate = recipe["learning_rate"]
    teacher = context.teacher if recipe["distill_alpha"] > 0 else None
    dataset = training_dataset(recipe["data"], context.tokenizer, samples=args.steps * args.batch_size, seed=seed)
    first_batch = PaddingCollator(pad_token_id_of(context.tokenizer))([dataset[i] for i in range(args.batch_size)])
    memory = recovery.training_memory_bytes(model, first_batch)
    train_metrics: dict[str, Any] = {"seconds": 0.0}
    if trained:
        train_metrics = train_adapter(
            model,
            context.tokenizer,
            dataset,
            output / f"{name}-seed{seed}",
            learning_rate=learning_rate,
            batch_size=args.batch_size,
            max_steps=args.steps,
            seed=seed,
            save_steps=10**9,
            logging_steps=10,
            disable_tqdm=False,
            device=context.device,
            teacher=teacher,
            distill_alpha=recipe["distill_alpha"] if teacher is not None else 1.0,
        )
    results = evaluate(model, context)
    return {
        "seed": seed,
        "trainable_params": trainable,
        "tasks": accuracy_of(results),
        "avg_acc": recovery.headline_accuracy(results),
        "ppl": results.get("perplexity"),
        "sparsity_after_merge": merged_sparsity(model),
        "train_seconds": train_metrics.get("seconds", 0.0),
        "seconds_per_step": train_metrics.get("seconds_per_step"),
        "train_memory_mb": memory / 2**20,
        "peak_cuda_mb": train_metrics.get("peak_cuda_mb"),
        "device": str(context.device),
        "learning_rate": learning_rate if trained else None,
        "data": recipe["data"] if trained else None,
        "distill_alpha": recipe["distill_alpha"] if teacher is not None else None,
        "items": headline_item_scores(results),
        "pruned_weights_sha256": context.pruned_fingerprint,
    }


def measured_alike(earlier: dict[str, Any], settings: dict[str, Any]) -> bool:
    """Whether an earlier results file measured what these settings measure (where it ran, lm-eval's batch size,
    threads and the methods and seeds it planned do not change a run's numbers)."""
    same = ("model", "method", "sparsity", "pattern", "heads", "steps", "batch_size", "limit", "perplexity_passages",
            "prune_samples", "calibration_samples", "pairs", "data", "distill_alpha", "vector_lr",
            "matrix_lr")  # fmt: skip
    return all(earlier.get(key) == settings.get(key) for key in same)


def finished_runs(reports: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Runs already in earlier results files made with the same measurement settings, to be kept, not redone: the
    benchmark's own file, and those of shards run elsewhere (``--resume-from``), as read (``{}``: no file yet). A run
    trained otherwise than these settings would train it now (another recipe or learning rate) is dropped. The dense
    and pruned rows come back under ``"__reference__"``."""
    kept: dict[str, list[dict[str, Any]]] = {}
    seen: set[tuple[str, int]] = set()
    for earlier in reports:
        if not earlier or not measured_alike(earlier["settings"], settings):
            continue
        # Runs of files written before runs recorded their device ran where that file's settings say (None: CPU).
        earlier_device = earlier["settings"].get("device") or "cpu"
        references = [
            row | {"device": row.get("device", earlier_device)} for row in earlier["rows"] if "runs" not in row
        ]
        # The first file's dense and pruned rows, unless a later one kept their items too (measured alike).
        if "__reference__" not in kept or (
            all("items" in row for row in references) and not all("items" in row for row in kept["__reference__"])
        ):
            kept["__reference__"] = references
        for row in earlier["rows"]:
            for run in row.get("runs", []):
                if (row["method"], run["seed"]) in seen or not trained_as_now(row["method"], run, settings):
                    continue
                seen.add((row["method"], run["seed"]))
                kept.setdefault(row["method"], []).append(run | {"device": run.get("device", earlier_device)})
    return kept


def json_settings(arguments: dict[str, Any]) -> dict[str, Any]:
    """The command's arguments as the results file records them (paths, and lists of them, as strings)."""

    def plain(value: Any) -> Any:
        return [plain(item) for item in value] if isinstance(value, list) else str(value) if isinstance(value, Path) else value

    return {key: plain(value) for key, value in arguments.items()}


def own_seconds(report: dict[str, Any]) -> float:
    """Seconds a results file's own runs took: its total less the shards merged into it."""
    return report.get("own_seconds", report.get("total_seconds", 0.0) - sum(report.get("shard_seconds", {}).values()))


def shard_times(output: Path, earlier: dict[str, Any], shards: dict[Path, dict[str, Any]]) -> dict[str, float]:
    """Seconds of every results file whose runs a merge into ``output`` holds, each counted once by its path: the
    shards merged into ``output`` before, those given now, and the shards those merged themselves (a merged file's
    total is its own time and theirs). ``output``'s own time is counted apart, so it is left out."""
    seconds = dict(earlier.get("shard_seconds", {}))
    for report in shards.values():
        seconds |= report.get("shard_seconds", {})
    seconds |= {str(path.resolve()): own_seconds(report) for path, report in shards.items()}
    seconds.pop(str(output.resolve()), None)
    return seconds


def merged_sparsity(model) -> float | None:
    if not isinstance(model, PeftModel):  # trained in place (sparse fine-tuning): nothing to merge
        return measure_sparsity(model)["overall_sparsity"]
    try:
        return recovery.sparsity_after_merge(model)
    except ValueError:  # e.g. BEFT cannot merge into a projection without a bias
        return None


def aggregate(
    name: str,
    runs: list[dict[str, Any]],
    dense: dict[str, Any],
    pruned: dict[str, Any],
    tasks_above_chance: list[str] | None = None,
) -> dict[str, Any]:
    def mean_spread(values: list[float | None]) -> tuple[float | None, float]:
        present = [value for value in values if value is not None]  # None: no gap to recover
        if not present:
            return None, 0.0
        return statistics.mean(present), (statistics.stdev(present) if len(present) > 1 else 0.0)

    avg_acc, avg_acc_std = mean_spread([run["avg_acc"] for run in runs])
    ppl, ppl_std = mean_spread([run["ppl"] for run in runs])
    recovered = [recovery.gap_recovered(dense["avg_acc"], pruned["avg_acc"], run["avg_acc"]) for run in runs]
    # Perplexity gap in log space: log-perplexity is the mean NLL, the quantity training lowers.
    recovered_ppl = [
        recovery.gap_recovered(-math.log(dense["ppl"]), -math.log(pruned["ppl"]), -math.log(run["ppl"])) for run in runs
    ]
    train_seconds_by_device = {
        device: statistics.mean(run["train_seconds"] for run in runs if run.get("device", "?") == device)
        for device in sorted({run.get("device", "?") for run in runs})
    }
    gap, gap_std = mean_spread(recovered)
    # Item noise is shared by every seed (the same items), so averaging seeds does not shrink it.
    item_stderr, _ = mean_spread([item_noise(dense, pruned, run) for run in runs])
    gap_ppl, gap_ppl_std = mean_spread(recovered_ppl)
    above = tasks_above_chance or []
    gap_above, gap_above_std = mean_spread(
        [recovery.gap_recovered_on(above, dense["tasks"], pruned["tasks"], run["tasks"]) for run in runs]
    )
    item_stderr_above, _ = mean_spread([item_noise(dense, pruned, run, above) for run in runs])
    return {
        "method": name,
        "trainable_params": runs[0]["trainable_params"],
        "avg_acc": avg_acc,
        "avg_acc_std": avg_acc_std,
        "tasks": {task: statistics.mean(run["tasks"][task] for run in runs) for task in runs[0]["tasks"]},
        "ppl": ppl,
        "ppl_std": ppl_std,
        "gap_recovered": gap,
        "gap_recovered_std": gap_std,
        "gap_recovered_item_stderr": item_stderr,
        # The same share over the tasks the dense model is above chance on (report["above_chance"]["tasks"]).
        "gap_recovered_above_chance": gap_above,
        "gap_recovered_above_chance_std": gap_above_std,
        "gap_recovered_above_chance_item_stderr": item_stderr_above,
        "gap_recovered_ppl": gap_ppl,
        "gap_recovered_ppl_std": gap_ppl_std,
        "sparsity": pruned["sparsity"],
        "sparsity_after_merge": runs[0]["sparsity_after_merge"],
        "train_memory_mb": runs[0]["train_memory_mb"],
        "train_seconds": statistics.mean(run["train_seconds"] for run in runs),
        # A mean over a GPU and a CPU run says nothing: the time per device too.
        "train_seconds_by_device": train_seconds_by_device,
        "seeds": [run["seed"] for run in runs],
        "device": ",".join(train_seconds_by_device),
        "runs": runs,
    }


def paired_differences(rows: list[dict[str, Any]], against: str, tasks: list[str]) -> dict[str, dict[str, Any]]:
    """Over ``tasks``, each row's accuracy minus row ``against``'s on the same items, with the paired standard error
    (``recovery.paired_stderr``): the difference of two methods with the noise of the items they share taken out.
    Two trained rows are compared over every seed both ran and kept items for, each item's score averaged over
    those seeds (so a second seed narrows the comparison rather than being left out); the dense and pruned rows,
    one measurement each, pair with every seed of the other row that kept items. Rows with no such seed are left
    out."""

    def runs_with_items(row: dict[str, Any]) -> dict[int | None, dict[str, Any]]:
        runs = row["runs"] if "runs" in row else [row | {"seed": None}]
        return {run["seed"]: run for run in runs if "items" in run}

    def mean_items(runs: list[dict[str, Any]]) -> dict[str, Any]:
        decoded = [decoded_items(run, tasks) for run in runs]
        return {task: sum(items[task].astype(float) for items in decoded) / len(decoded) for task in decoded[0]}

    def accuracy(items: dict[str, Any]) -> float:
        return statistics.mean(float(scores.mean()) for scores in items.values())

    reference = next((row for row in rows if row["method"] == against), None)
    if reference is None or not tasks:
        return {}
    reference_runs = runs_with_items(reference)
    differences = {}
    for row in rows:
        if row["method"] == against:
            continue
        row_runs = runs_with_items(row)
        if "runs" in row and "runs" in reference:
            seeds = sorted(set(row_runs) & set(reference_runs))
            runs, base = [row_runs[seed] for seed in seeds], [reference_runs[seed] for seed in seeds]
        else:  # one side is the dense or pruned measurement: every seed of the other side
            seeds = sorted(seed for seed in (row_runs if "runs" in row else reference_runs) if seed is not None)
            runs, base = list(row_runs.values()), list(reference_runs.values())
        if not runs or not base:
            continue
        items, base_items = mean_items(runs), mean_items(base)
        differences[row["method"]] = {
            "seeds": seeds,
            "difference": accuracy(items) - accuracy(base_items),
            "stderr": recovery.paired_stderr(items, base_items),
        }
    return differences


def markdown_table(report: dict[str, Any]) -> str:
    rows = report["rows"]
    tasks = list(rows[0]["tasks"])
    lines = [
        "| method | trainable params | " + " | ".join(tasks) + " | avg acc | gap recovered (acc) | item noise (acc) | "
        "gap recovered (acc, tasks above chance) | ppl | gap recovered (log ppl) | sparsity after merge | train s | "
        "train memory MB | seeds | ran on |",
        "|---|" + "---|" * (len(tasks) + 12),
    ]

    def item_noise_cell(row, key="gap_recovered_item_stderr"):
        noise = row.get(key)
        return "" if noise is None else f"±{noise:.0%}"

    def above_chance_cell(row):
        share = spread(row.get("gap_recovered_above_chance"), row.get("gap_recovered_above_chance_std"), "{:.0%}")
        noise = item_noise_cell(row, "gap_recovered_above_chance_item_stderr")
        return share + (f" (items {noise})" if share and noise else "")

    def spread(value, std, fmt):
        return (fmt.format(value) + (f" ± {fmt.format(std)}" if std else "")) if value is not None else ""

    def train_time(row):
        by_device = row.get("train_seconds_by_device") or {}
        if len(by_device) > 1:
            return " / ".join(f"{seconds:.0f} {device}" for device, seconds in by_device.items())
        return f"{row.get('train_seconds', 0):.0f}"

    for row in rows:
        lines.append(
            f"| {row['method']} | {row['trainable_params']:,} | "
            + " | ".join(f"{row['tasks'][task]:.3f}" for task in tasks)
            + f" | {spread(row['avg_acc'], row.get('avg_acc_std'), '{:.3f}')}"
            + f" | {spread(row.get('gap_recovered'), row.get('gap_recovered_std'), '{:.0%}')} | {item_noise_cell(row)}"
            + f" | {above_chance_cell(row)}"
            + f" | {spread(row['ppl'], row.get('ppl_std'), '{:.2f}')}"
            + f" | {spread(row.get('gap_recovered_ppl'), row.get('gap_recovered_ppl_std'), '{:.0%}')}"
            + f" | {spread(row['sparsity_after_merge'], 0, '{:.4f}')} | {train_time(row)}"
            + f" | {spread(row.get('train_memory_mb'), 0, '{:.0f}')} | "
            + ",".join(map(str, row.get("seeds", [])))
            + f" | {row.get('device', '')} |"
        )
    if report.get("paired_with"):
        paired = report["paired_with"]

        def seed_of(pair: dict[str, Any]) -> str:
            seeds = pair["seeds"]
            return "" if not seeds else f" (seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))})"

        def stderr_of(pair: dict[str, Any]) -> str:
            return "" if pair["stderr"] is None else f" ± {pair['stderr']:.4f}"

        lines.append(
            f"\nOn the same items, over the tasks above chance, accuracy minus {paired['method']}'s (± the paired"
            " standard error): "
            + (
                "; ".join(
                    f"{method}{seed_of(pair)} {pair['difference']:+.4f}{stderr_of(pair)}"
                    for method, pair in paired["differences"].items()
                )
                or "none (no task above chance, or no other row kept its items on a seed this one ran)"
            )
            + "."
        )
    if "above_chance" in report:
        chance = report["above_chance"]
        lines.append(
            f"\nTasks above chance (the dense model beats a question-blind answer by more than {chance['z']} standard"
            f" errors): {', '.join(chance['tasks']) or 'none'}. Chance: "
            + ", ".join(f"{task} {value:.3f}" for task, value in chance["chance"].items())
            + "."
        )
    return "\n".join(lines)


def spread_labels(
    points: list[tuple[float, float]], min_gap: float, x_factor: float = 1.5, reaches: list[float] | None = None
) -> list[float]:
    """Heights for the labels of (x, y) points so that labels of points at nearly the same x (within ``x_factor``,
    as on a log axis) stand at least ``min_gap`` apart: several methods share RestoreLCC's parameter count.
    ``reaches`` (one per point) widens that for a long label: it runs right to ``reach`` times its x, so a point
    further right but under it also counts as near."""
    heights = [y for _, y in points]
    reaches = reaches or [x_factor] * len(points)

    def near(one: int, other: int) -> bool:
        left, right = sorted((one, other), key=lambda i: points[i][0])
        return points[right][0] / points[left][0] < max(x_factor, reaches[left])

    placed: list[int] = []  # labels already set, from the lowest point up
    for index in sorted(range(len(points)), key=lambda i: points[i][1]):
        for height in sorted(heights[other] for other in placed if near(index, other)):
            if heights[index] - height < min_gap:
                heights[index] = height + min_gap
        placed.append(index)
    return heights


# The paired item noise of each accuracy share a plot panel shows (perplexity has none: it is not per item).
ITEM_NOISE_OF = {
    "gap_recovered": "gap_recovered_item_stderr",
    "gap_recovered_above_chance": "gap_recovered_above_chance_item_stderr",
}


def plot(report: dict[str, Any], path: Path) -> None:
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    above = report.get("above_chance", {}).get("tasks")
    panels = [("gap_recovered", "share of the accuracy gap recovered\n(all tasks)")]
    if above:
        panels.append(("gap_recovered_above_chance", f"share of the accuracy gap recovered\n({len(above)} tasks above chance)"))
    panels.append(("gap_recovered_ppl", "share of the log-perplexity gap recovered"))
    figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 6.5))
    for axis, (key, label) in zip(axes, panels, strict=True):
        rows = [row for row in report["rows"] if row.get(key) is not None and row["trainable_params"] > 0]
        # The axis always shows 0 and 1 (the lines drawn there): labels are spread by its height, not the points'.
        values = [row[key] for row in rows] + [0.0, 1.0]
        # A label starts at 1.08x its point; a character is about 0.03 decade at fontsize 7 (read off the plot).
        reaches = [1.08 * 10 ** (0.03 * len(row["method"])) for row in rows]
        label_heights = spread_labels(
            [(row["trainable_params"], row[key]) for row in rows],
            0.045 * (max(values) - min(values)),
            x_factor=3.0,  # a short label runs about half a decade to the right of its point
            reaches=reaches,
        )
        for row, label_height in zip(rows, label_heights, strict=True):
            colour = "tab:red" if row["method"].startswith("restorelcc") else "tab:blue"
            axis.errorbar(row["trainable_params"], row[key], yerr=row.get(f"{key}_std") or 0, fmt="o", color=colour)
            item_noise_key = ITEM_NOISE_OF.get(key)
            if item_noise_key and row.get(item_noise_key):
                # Item noise beside the seeds' spread: on a small gap it is the larger error, and it says how far
                # apart two points must be before the items can tell them apart.
                axis.errorbar(row["trainable_params"], row[key], yerr=row[item_noise_key], fmt="none",
                              color=colour, alpha=0.35, capsize=4, linewidth=3)  # fmt: skip
            axis.annotate(
                row["method"],
                (row["trainable_params"], row[key]),
                xytext=(row["trainable_params"] * 1.08, label_height),
                fontsize=7,
                arrowprops={"arrowstyle": "-", "color": "grey", "linewidth": 0.5} if label_height != row[key] else None,
            )
        axis.set_xscale("log")
        if rows:  # room for the rightmost labels inside the axis
            axis.set_xlim(right=max(row["trainable_params"] * reach for row, reach in zip(rows, reaches, strict=True)))
        axis.axhline(1.0, color="grey", linestyle=":", linewidth=1)
        if key != "gap_recovered_ppl":
            axis.axhline(GOAL_SHARE, color="tab:green", linestyle="--", linewidth=1)
            axis.annotate(f"goal: {GOAL_SHARE:.0%}", (0.01, GOAL_SHARE), xycoords=("axes fraction", "data"),
                          xytext=(0, 3), textcoords="offset points", fontsize=7, color="tab:green")  # fmt: skip
        axis.axhline(0.0, color="grey", linewidth=1)
        axis.set_xlabel("trainable parameters (log)")
        axis.set_ylabel(label)
    settings = report["settings"]
    recipe = (
        f"distillation (alpha {settings['distill_alpha']}) on {settings['data']} data"
        if settings.get("distill_alpha")
        else f"LM loss on {settings.get('data', 'instruction')} data"
    )
    figure.suptitle(
        f"{settings['model']} {settings['method']} {settings.get('pattern') or settings['sparsity']}: {settings['steps']} steps x batch "
        f"{settings['batch_size']}, {settings['limit']} items/task\n{recipe}; rows named -instruction or -in-task: the "
        "paper's recipe, LM loss on the answers\nbars: spread over seeds"
        + ("; wide faint bars: item noise (paired SE)" * any(row.get("gap_recovered_item_stderr") for row in report["rows"]))
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short sha256 of a model's weights: which model a row measured. The same Wanda pass on another machine can
    prune differently (float rounding decides near-ties), so the settings alone do not say."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def check_same_models(reference: dict[str, dict[str, Any]], fingerprints: dict[str, str]) -> None:
    """Refuse to add runs to earlier results measured on other dense or pruned weights than these."""
    for name, fingerprint in fingerprints.items():
        earlier = reference.get(name, {}).get("weights_sha256")
        if earlier is not None and earlier != fingerprint:
            raise SystemExit(
                f"the {name} model here (weights sha256 {fingerprint}) is not the one the earlier results measured"
                f" ({earlier}): its runs would be compared with another model's row. Give another --output and no"
                " --resume-from to measure this model apart, or run where the earlier results were made."
            )


def runs_on_other_weights(reference: dict[str, dict[str, Any]], runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The runs (``"method seed N"``) that record training on other pruned weights than the pruned row measured."""
    measured = reference.get("pruned", {}).get("weights_sha256")
    return [
        f"{name} seed {run['seed']}"
        for name, method_runs in runs.items()
        for run in method_runs
        if measured is not None and run.get("pruned_weights_sha256") not in (None, measured)
    ]


def prepare(
    args: argparse.Namespace, reference: dict[str, dict[str, Any]], timer: recovery.StageTimer
) -> tuple[Context, dict[str, Any]]:
    """The context every method uses and the pruning report: the pruned model and its lost components (cached per
    setting, so a restarted benchmark goes straight to the methods), and the dense and pruned rows where no earlier
    results file has them (added to ``reference``)."""
    tokenizer = load_tokenizer(args.model)
    device = default_device(args.device)
    dense_model = load_model(args.model).to(device)
    # The key of an unstructured run has no pattern part, so caches made before --pattern existed stay found.
    shape = f"{args.sparsity}" + (f"-{args.pattern.replace(':', 'of')}" if args.pattern else "")
    key = f"{Path(str(args.model)).name}-{args.method}-{shape}-p{args.prune_samples}-c{args.calibration_samples}-{args.pairs}"
    cached = args.output / "recovery-work" / "cache" / key
    if (cached / "lost_components").exists():
        pruned_model = load_model(cached / "pruned").to(device)
        pruning_report = load_report(cached / "pruned")
        components = LostComponents.load(cached / "lost_components")
        components.check_matches(pruned_model)
    else:
        with timer.stage("prune"):
            pruned_model, pruning_report = recovery.prune_copy(
                dense_model, tokenizer, args.method, None if args.pattern else args.sparsity, args.pattern,
                samples=args.prune_samples,
            )
        with timer.stage("calibrate"):
            components = recovery.calibrate_components(
                dense_model, pruned_model, tokenizer, pruning_report, args.calibration_samples, args.pairs
            )
        save_pruned(pruned_model, tokenizer, cached / "pruned", pruning_report)
        components.save(cached / "lost_components")
    fingerprints = {"dense": weights_fingerprint(dense_model), "pruned": weights_fingerprint(pruned_model)}
    check_same_models(reference, fingerprints)
    context = Context(pruned_model, components, tokenizer, args)
    context.pruned_fingerprint = fingerprints["pruned"]
    sparsity = measure_sparsity(pruned_model)["overall_sparsity"]
    for name, model in (("dense", dense_model), ("pruned", pruned_model)):
        if name in reference:
            continue
        with timer.stage(f"evaluate {name}"):
            results = evaluate(model, context)
        reference[name] = {
            "method": name,
            "trainable_params": 0,
            "tasks": accuracy_of(results),
            "avg_acc": recovery.headline_accuracy(results),
            "ppl": results.get("perplexity"),
            "sparsity": sparsity if name == "pruned" else 0.0,
            "sparsity_after_merge": sparsity if name == "pruned" else 0.0,
            "device": str(device),
            "items": headline_item_scores(results),
            "weights_sha256": fingerprints[name],
        }
    if args.distill_alpha > 0:
        context.teacher = dense_model  # the context keeps the dense model only as the distillation teacher
    return context, pruning_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--sparsity", type=float, default=None, help="fraction of weights to zero (default 0.5)")
    parser.add_argument(
        "--pattern", default=None, metavar="N:M", help="semi-structured pruning, e.g. 2:4 (implies the sparsity)"
    )
    parser.add_argument("--heads", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=40, help="first N items of each of the seven tasks")
    parser.add_argument("--perplexity-passages", type=int, default=48)
    parser.add_argument("--prune-samples", type=int, default=64, help="Wanda/SparseGPT calibration windows")
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--seeds", default="0,1", help="seeds for the main methods")
    parser.add_argument("--claim-seeds", default="0", help="seeds for the claim rows (FFN, share sweep, selection)")
    parser.add_argument("--methods", default=",".join(MAIN_METHODS + CLAIM_METHODS))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is faster on a busy machine)")
    parser.add_argument(
        "--data",
        default="text",
        help=(
            f"training data: instruction, instruction-wide, {', '.join(IN_TASK_DATA_CHOICES)},"
            f" {MIXED_EXTRA_DATA}, {MIXED_EXTRA_SCIENCE_DATA}, {CLOZE_WIDE_DATA}, text, mixed or a .jsonl file"
        ),
    )
    parser.add_argument(
        "--distill-alpha",
        type=float,
        default=1.0,
        help="weight of KL to the dense model in the loss (1: pure distillation, 0: the LM loss alone, no teacher)",
    )
    parser.add_argument("--vector-lr", type=float, default=DEFAULT_LEARNING_RATES[VECTOR_LR])
    parser.add_argument("--matrix-lr", type=float, default=DEFAULT_LEARNING_RATES[MATRIX_LR], help="LoRA and DoRA")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--eval-batch-size", type=int, default=16, help="lm-eval batch size (raise it on a GPU)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--resume-from",
        type=Path,
        nargs="*",
        default=[],
        help="results files of shards run elsewhere with the same settings: their runs are kept, not redone",
    )
    parser.add_argument(
        "--merge-only",
        action="store_true",
        help="run nothing: write one report from --output's results and the --resume-from shards (same settings)",
    )
    parser.add_argument(
        "--paired-with",
        default=None,
        metavar="METHOD",
        help="also report every row's accuracy over the tasks above chance minus this row's, on the same items",
    )
    args = parser.parse_args()
    try:  # the results file records the sparsity an N:M pattern implies, so runs resume alike whichever was given
        args.sparsity, _ = resolve_sparsity(0.5 if args.sparsity is None and not args.pattern else args.sparsity,
                                            args.pattern)  # fmt: skip
    except ValueError as error:
        parser.error(f"--sparsity/--pattern: {error}")
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {sorted(METHODS)}")
    in_task = [name for name in methods if recipe_of(name, vars(args))["data"] in IN_TASK_DATA_CHOICES]
    if in_task and args.limit > EVALUATED_ITEMS:
        parser.error(
            f"{', '.join(in_task)} train on the evaluation tasks' items after the first {EVALUATED_ITEMS}, and"
            f" --limit {args.limit} would score some of them: give --limit {EVALUATED_ITEMS} or less, or leave"
            " those methods out of --methods"
        )
    if args.paired_with is not None and args.paired_with not in {"dense", "pruned", *METHODS}:
        parser.error(f"--paired-with: unknown row {args.paired_with!r}; give dense, pruned or one of {sorted(METHODS)}")
    missing = [str(path) for path in args.resume_from if not path.is_file()]
    if missing:
        parser.error(f"--resume-from: no results file at {', '.join(missing)}; give the recovery.json of a shard")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results_file = args.output / "recovery.json"
    # A resumed benchmark adds its time to what its earlier runs took, and a merged shard the time of its own runs
    # (once per shard, and not the time of the files that shard itself resumed from).
    earlier = json.loads(results_file.read_text()) if results_file.exists() else {}
    shard_reports = {path: json.loads(path.read_text()) for path in args.resume_from}
    shard_seconds = shard_times(results_file, earlier, shard_reports)
    earlier_seconds = own_seconds(earlier)
    settings = json_settings(vars(args))
    if earlier and measured_alike(earlier["settings"], settings):
        # The file keeps the runs of the shards merged into it before, so its settings keep naming them.
        settings["resume_from"] = list(dict.fromkeys(earlier["settings"].get("resume_from", []) + settings["resume_from"]))
    previous = finished_runs([earlier, *shard_reports.values()], settings)
    reference = {row["method"]: row for row in previous.pop("__reference__", [])}
    runs: dict[str, list[dict[str, Any]]] = {name: list(method_runs) for name, method_runs in previous.items()}
    timer = recovery.StageTimer()
    mixed = runs_on_other_weights(reference, runs)
    if mixed:
        parser.error(
            f"{', '.join(mixed)} trained on other pruned weights than the pruned row measured: merge results made"
            " from the same pruned model (another machine can prune differently), or measure them apart"
        )
    if args.merge_only:
        # A merge is bookkeeping: no model is loaded, so it runs wherever the results files are.
        if not {"dense", "pruned"} <= set(reference):  # these rows come only from files measured alike
            files = [str(path) for path in (results_file, *args.resume_from) if path.exists()]
            parser.error(
                f"--merge-only: no dense and pruned rows measured with these settings in {files};"
                " give the shards' recovery.json with --resume-from, and the measurement flags they ran with"
            )
        alike = next(report for report in (earlier, *shard_reports.values())
                     if report and measured_alike(report["settings"], settings))  # fmt: skip
        pruning_report, heads_total = alike["pruning"], alike["heads_total"]
        methods = []
        # The merge planned no runs: its file records the methods it holds, not the defaults of flags it ignored
        # (each run records its own seed).
        settings |= {"methods": ",".join(runs), "seeds": None, "claim_seeds": None}
    else:
        context, pruning_report = prepare(args, reference, timer)  # its files create their own folders
        heads_total = context.total_heads()
    args.output.mkdir(parents=True, exist_ok=True)

    report: dict[str, Any] = {"settings": settings, "rows": [reference["dense"], reference["pruned"]]}
    # First seed of everything first, so an interrupted run still has one full comparison.
    plan = sorted(
        (
            (name, int(seed))
            for name in methods
            # Untrained rows are deterministic: one seed says all there is.
            for seed in (args.seeds if name in MAIN_METHODS and METHODS[name][2] else args.claim_seeds).split(",")
        ),
        key=lambda item: (item[1] != int(args.seeds.split(",")[0]), methods.index(item[0])),
    )
    failures: dict[str, str] = {}
    done = {(name, run["seed"]) for name, method_runs in runs.items() for run in method_runs}

    report["above_chance"] = above_chance(reference["dense"], args.limit)

    def write_report() -> None:
        report["rows"] = [reference["dense"], reference["pruned"]] + [
            aggregate(method, method_runs, reference["dense"], reference["pruned"], report["above_chance"]["tasks"])
            for method, method_runs in runs.items()
            if method_runs
        ]
        if args.paired_with:
            report["paired_with"] = {
                "method": args.paired_with,
                "differences": paired_differences(report["rows"], args.paired_with, report["above_chance"]["tasks"]),
            }
        report["failures"] = failures
        report["pruning"] = {k: pruning_report.get(k) for k in ("method", "sparsity_target", "pattern", "seconds")}
        report["heads_total"] = heads_total
        report["stage_seconds"] = timer.seconds
        report["own_seconds"] = earlier_seconds + time.perf_counter() - started
        report["shard_seconds"] = shard_seconds
        report["total_seconds"] = report["own_seconds"] + sum(shard_seconds.values())
        report["finished"] = all(key in done for key in plan)
        (args.output / "recovery.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.output / "recovery.md").write_text(markdown_table(report) + "\n")
        plot(report, args.output / "recovery.png")

    for name, seed in tqdm(plan, desc="methods x seeds"):
        if (name, seed) in done:
            continue
        try:
            runs.setdefault(name, []).append(run_method(name, seed, context, args.output / "recovery-work"))
            done.add((name, seed))
        except Exception as error:  # noqa: BLE001 - one broken method must not cost the others' results
            failures[f"{name}-seed{seed}"] = f"{type(error).__name__}: {error}"
            print(f"{name} seed {seed} failed: {failures[f'{name}-seed{seed}']}")
        write_report()
    write_report()  # also when every planned run was already done: merges the shards given by --resume-from
    print(markdown_table(report))
    print(f"\ntotal {report['total_seconds'] / 60:.1f} min; results in {args.output / 'recovery.json'}")


if __name__ == "__main__":
    main()
