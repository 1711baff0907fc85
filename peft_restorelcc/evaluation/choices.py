"""The evaluation's task names, readable without torch or lm-eval: the command line builds its parsers from here.
"""

from __future__ import annotations

# The seven zero-shot tasks of the paper (and of Wanda / SparseGPT), in the order they are usually reported.
PAPER_TASKS: tuple[str, ...] = (
    "boolq",
    "rte",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
)

# The name that stands for the seven bundled tasks at once (``--tasks paper-bundled``).
PAPER_BUNDLED = "paper-bundled"

# How a user finds the names of lm-eval's own tasks (the ``lm-eval`` command that comes with lm-eval).
LIST_TASKS_HINT = "list lm-eval's tasks with `lm-eval ls tasks` (your own task YAMLs: --include-path DIR)"

# Prefix of the lm-eval task names registered here; keeps them apart from lm-eval's own (hub-backed) tasks.
TASK_PREFIX = "restorelcc_"
