"""Evaluation: lm-eval tasks and perplexity (``tasks``), the statistics of a recovered gap and the costs of a run
(``statistics``)."""

from __future__ import annotations

from .. import lazy_face

# Each name loads its module on first use (see ``lazy_face``).
__getattr__, __all__ = lazy_face(
    __name__,
    {
        ".choices": ("LIST_TASKS_HINT", "PAPER_BUNDLED", "PAPER_TASKS", "TASK_PREFIX"),
        ".statistics": (
            "ABOVE_CHANCE_Z",
            "StageTimer",
            "gap_recovered",
            "gap_recovered_on",
            "gap_recovered_stderr",
            "headline_accuracy",
            "headline_items",
            "headline_metric",
            "headline_stderr",
            "item_scores",
            "paired_stderr",
            "peak_rss_bytes",
            "tasks_above_chance",
            "trainable_parameters",
            "training_memory_bytes",
        ),
        ".tasks": (
            "auto_batch_size",
            "chance_accuracy",
            "evaluate_tasks",
            "format_results_table",
            "lm_eval_task_configs",
            "perplexity",
            "resolve_tasks",
            "task_size",
            "vocab_size_of",
        ),
    },
)
