"""Evaluation through the real lm-eval harness on the bundled validation data, with a tiny random model and a
tokenizer trained here (offline) whose vocabulary matches the tiny model's."""

from __future__ import annotations

import copy
import functools
import math
from pathlib import Path

import datasets
import lm_eval
import pytest
import torch
from test_data import EXPECTED_EVAL_SIZES
from tiny_models import VOCAB_SIZE, make_tiny_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from peft_restorelcc.data import eval_dataset
from peft_restorelcc.data.choices import EVAL_TASKS
from peft_restorelcc.evaluation import tasks as evaluation
from peft_restorelcc.evaluation.choices import PAPER_TASKS
from peft_restorelcc.evaluation.tasks import (
    evaluate_tasks,
    format_results_table,
    lm_eval_task_configs,
    perplexity,
    resolve_tasks,
    task_size,
)

# A handful of sentences covering upper and lower case letters and common punctuation: enough for a character-
# level BPE with a few merges; anything else (digits, rare symbols) becomes <unk>.
_TOKENIZER_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: is the sky blue? Answer: yes, it is.",
    "A man is sitting on a roof. He starts pulling up roofing.",
    "Which technology was developed most recently?",
    "Sarah was a much better surgeon than Maria, so she always got the harder cases.",
    "True or False? No.",
    "JUMPING VEXED WIZARDS QUICKLY BOX THE FROG",
    "Deep sea animals live far beneath the surface of the ocean.",
]

# Sizes of the bundled validation splits.
DOCUMENTED_SIZES = EXPECTED_EVAL_SIZES


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A real BPE tokenizer of exactly VOCAB_SIZE tokens, with pad/bos/eos at ids 0/1/2 like the tiny models."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], show_progress=False
    )
    backend.train_from_iterator(_TOKENIZER_TEXT, trainer)
    assert backend.get_vocab_size() == VOCAB_SIZE
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def make_eval_model(seed: int = 0) -> torch.nn.Module:
    # Longer positions than the default 64 so that prompts are not all cut to their last few characters. Larger
    # random weights than the default 0.02: with near-uniform next-token distributions every model just prefers
    # the answer with the fewest tokens, and pruning would not change a single choice.
    return make_tiny_model("llama", seed=seed, max_position_embeddings=128, initializer_range=0.3)


def zero_half_of_linear_weights(model: torch.nn.Module) -> torch.nn.Module:
    """A copy with the 50% smallest-magnitude weights of every Linear set to zero (a crude pruned model)."""
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for module in pruned.modules():
            if isinstance(module, torch.nn.Linear):
                weight = module.weight
                threshold = weight.abs().flatten().kthvalue(weight.numel() // 2).values
                weight[weight.abs() <= threshold] = 0.0
    return pruned


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return make_eval_model()


# ------------------------------------------------------------------------------------------- task definitions

_LM_EVAL_YAMLS = {
    "boolq": "super_glue/boolq/default.yaml",
    "rte": "glue/rte/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
}


def _raw_split(task: str, n: int, **_ignored) -> datasets.DatasetDict:
    """The bundled rows as lm-eval's own task expects them (only BoolQ's label differs in format on disk)."""
    dataset = eval_dataset(task).select(range(n))
    if task == "boolq":  # google/boolq on disk: bool `answer`; super_glue's integer `label` in lm-eval's task
        dataset = dataset.add_column("label", [int(answer) for answer in dataset["answer"]])
    return datasets.DatasetDict({"validation": dataset})


def test_requests_match_lm_eval_own_task_definitions() -> None:
    """Our tasks send the model exactly the (context, continuation) pairs, and expect exactly the gold answers,
    of lm-eval's own installed task YAMLs fed with the same rows."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    manager = TaskManager(include_defaults=False)
    for task in PAPER_TASKS:
        reference = load_yaml(tasks_dir / _LM_EVAL_YAMLS[task])
        reference.update(custom_dataset=functools.partial(_raw_split, task, 6), training_split=None, test_split=None)
        (theirs,) = manager.load(reference)["tasks"].values()
        (ours,) = manager.load(lm_eval_task_configs([task], limit=6))["tasks"].values()
        for built in (theirs, ours):
            built.set_config("num_fewshot", 0)
            built.set_fewshot_seed(1234)
            built.build_all_requests(limit=6)
        assert [i.args for i in ours.instances] == [i.args for i in theirs.instances], task
        assert [ours.doc_to_target(d) for d in ours.eval_docs] == [theirs.doc_to_target(d) for d in theirs.eval_docs]
        assert ours.task_name == evaluation.TASK_PREFIX + task


def test_task_sizes_and_names() -> None:
    assert PAPER_TASKS == tuple(DOCUMENTED_SIZES) == EVAL_TASKS
    assert {task: task_size(task) for task in PAPER_TASKS} == DOCUMENTED_SIZES
    assert resolve_tasks(None) == list(PAPER_TASKS)
    assert resolve_tasks(["rte", " boolq", "rte"]) == ["rte", "boolq"]
    assert resolve_tasks(["paper-bundled"]) == list(PAPER_TASKS)
    assert resolve_tasks(["rte", "paper-bundled"]) == ["rte", *(task for task in PAPER_TASKS if task != "rte")]
    with pytest.raises(ValueError, match="known tasks: boolq, rte, hellaswag"):
        resolve_tasks(["boolq", "piqa2"])


# ------------------------------------------------------------------------------------------- accuracy


def test_all_seven_tasks_run_with_limit(model, tokenizer) -> None:
    results = evaluate_tasks(model, tokenizer, limit=4, batch_size=16, per_item=True)
    assert list(results["tasks"]) == list(PAPER_TASKS)
    assert results["limit"] == 4
    assert results["num_items"] == {task: 4 for task in PAPER_TASKS}
    for task, scores in results["tasks"].items():
        assert set(scores) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}, task
        assert all(0.0 <= scores[metric] <= 1.0 for metric in ("acc", "acc_norm")), task
    for metric in ("acc", "acc_norm"):
        mean = sum(scores[metric] for scores in results["tasks"].values()) / len(PAPER_TASKS)
        assert results["average"][metric] == pytest.approx(mean)
    # Length normalisation is a no-op for WinoGrande's shared continuation.
    assert results["tasks"]["winogrande"]["acc_norm"] == results["tasks"]["winogrande"]["acc"]
    # Each item's score, in item order: they average to lm-eval's own accuracies.
    for task, scores in results["tasks"].items():
        for metric in ("acc", "acc_norm"):
            items = results["items"][task][metric]
            assert len(items) == 4 and set(items) <= {"0", "1"}, task
            assert items.count("1") / 4 == pytest.approx(scores[metric]), (task, metric)
    table = format_results_table(results)
    assert all(task in table for task in PAPER_TASKS) and "average" in table


def test_limit_keeps_the_first_items_and_never_more_than_the_split() -> None:
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_defaults=False)
    (whole,) = manager.load(lm_eval_task_configs(["arc_challenge"], limit=10_000))["tasks"].values()
    (first,) = manager.load(lm_eval_task_configs(["arc_challenge"], limit=3))["tasks"].values()
    assert len(whole.eval_docs) == DOCUMENTED_SIZES["arc_challenge"]
    assert list(first.eval_docs) == list(whole.eval_docs.select(range(3)))


def test_same_model_same_numbers_other_model_other_numbers(model, tokenizer) -> None:
    tasks = ["arc_easy", "boolq", "winogrande"]
    first = evaluate_tasks(model, tokenizer, tasks=tasks, limit=30, batch_size=8)
    # A different batch size regroups the requests; with the items fixed the scores must not move.
    second = evaluate_tasks(model, tokenizer, tasks=tasks, limit=30, batch_size=16, per_item=True)
    assert first == {key: value for key, value in second.items() if key != "items"}  # per_item only adds items
    pruned = evaluate_tasks(zero_half_of_linear_weights(model), tokenizer, tasks=tasks, limit=30, batch_size=16)
    assert pruned["tasks"] != first["tasks"]
    # Not only one item: the pruned model moves accuracy on every task.
    assert all(pruned["tasks"][task] != first["tasks"][task] for task in tasks)


def test_peft_model_is_evaluated_in_memory(model, tokenizer) -> None:
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    lora.train()
    results = evaluate_tasks(lora, tokenizer, tasks=["arc_challenge"], limit=5)
    assert results["num_items"] == {"arc_challenge": 5}
    assert lora.training, "the caller's train/eval mode is restored"


def test_bad_arguments(model, tokenizer) -> None:
    with pytest.raises(ValueError, match="known tasks"):
        evaluate_tasks(model, tokenizer, tasks=["nope"])
    with pytest.raises(ValueError, match="limit"):
        evaluate_tasks(model, tokenizer, tasks=["rte"], limit=0)


# ------------------------------------------------------------------------------------------- perplexity

_TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 6,
    "Which technology was developed most recently?",
    "Deep sea animals live far beneath the surface of the ocean, which is why they are known as deep sea animals.",
]


def test_perplexity_matches_the_model_loss_on_one_text(model, tokenizer) -> None:
    ids = tokenizer(_TEXTS[2], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = math.exp(float(model(input_ids=ids, labels=ids).loss))
    assert perplexity(model, tokenizer, [_TEXTS[2]], max_length=256) == pytest.approx(expected, rel=1e-5)


def test_perplexity_is_deterministic_batch_independent_and_weight_sensitive(model, tokenizer) -> None:
    value = perplexity(model, tokenizer, _TEXTS, max_length=32, batch_size=2)
    assert math.isfinite(value) and value > 1.0
    assert perplexity(model, tokenizer, _TEXTS, max_length=32, batch_size=2) == value
    # Padding is masked out: one window per batch gives the same value.
    assert perplexity(model, tokenizer, _TEXTS, max_length=32, batch_size=1) == pytest.approx(value, rel=1e-5)
    # Shorter windows give less context to every window's tokens: a different value.
    assert perplexity(model, tokenizer, _TEXTS, max_length=8, batch_size=2) != pytest.approx(value, rel=1e-3)
    pruned = zero_half_of_linear_weights(model)
    assert perplexity(pruned, tokenizer, _TEXTS, max_length=32) != pytest.approx(value, rel=1e-3)


def test_perplexity_rejects_nothing_to_predict(model, tokenizer) -> None:
    with pytest.raises(ValueError):
        perplexity(model, tokenizer, [""], max_length=16)
    with pytest.raises(ValueError):
        perplexity(model, tokenizer, _TEXTS, max_length=1)


def test_chance_is_the_common_answer_on_fixed_answers_and_one_over_the_choices_elsewhere() -> None:
    from peft_restorelcc.data import eval_dataset
    from peft_restorelcc.evaluation.tasks import chance_accuracy

    answers = eval_dataset("boolq")["answer"][:300]
    assert chance_accuracy("boolq", 300) == pytest.approx(max(answers.count(True), answers.count(False)) / 300)
    assert chance_accuracy("boolq", 300) > 0.6  # BoolQ's answers are mostly "yes"
    assert chance_accuracy("winogrande") == 0.5 and chance_accuracy("hellaswag", 50) == 0.25
    # ARC has items with three and five choices as well as four.
    arc = eval_dataset("arc_challenge")
    assert chance_accuracy("arc_challenge") == pytest.approx(sum(1 / len(row["text"]) for row in arc["choices"]) / len(arc))
    # A task of lm-eval's registry: its chance level is not known here.
    assert chance_accuracy("piqa") is None
