"""The names of the data there is: the evaluation tasks, the schemas of the user's files, the similarities that
pick wrong answers; readable without torch or datasets, so that the command line builds its help from here.
"""

from __future__ import annotations

EVAL_TASKS: tuple[str, ...] = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
# Evaluation scores the first EVALUATED_ITEMS items of each task; nothing else ever reads them.
EVALUATED_ITEMS = 300
# Task-specific recovery leaves the first SCORED_ITEMS items of its task to evaluation (``bundled.task_split``).
SCORED_ITEMS = EVALUATED_ITEMS

# The user's files: the suffixes read, and the fields each kind of row may use.
FILE_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv"}
# Calibration prompts: one text field.
PROMPT_FIELDS: tuple[str, ...] = ("text", "prompt")
# Probe pairs: the prompt, the correct answer, and either a wrong answer or the options with the correct one's index
# (or its text) in the answer field.
PAIR_PROMPT_FIELDS: tuple[str, ...] = ("prompt", "question")
CORRECT_FIELDS: tuple[str, ...] = ("correct", "answer", "label")
WRONG_FIELDS: tuple[str, ...] = ("wrong", "incorrect")
OPTIONS_FIELDS: tuple[str, ...] = ("options", "choices")

PROMPTS_HELP = "one of the fields " + " / ".join(PROMPT_FIELDS) + " (a string) per row"
PAIRS_HELP = (
    f"per row a prompt ({' / '.join(PAIR_PROMPT_FIELDS)}) and either a correct answer ({' / '.join(CORRECT_FIELDS)}) "
    f"with a wrong one ({' / '.join(WRONG_FIELDS)}), or a list of options ({' / '.join(OPTIONS_FIELDS)}) with the "
    f"correct option's 0-based index or text ({' / '.join(CORRECT_FIELDS)}); the wrong answer is then the option "
    "most similar to the correct one"
)
TRAINING_HELP = (
    "per row prompt + response, or instruction + output (+ input, the Alpaca schema), or messages (a chat, "
    "[{role, content}, ...], ending with the assistant's turn: rendered with the tokenizer's chat template), or text "
    "(plain text, loss on every token); the loss is on the response only"
)

# How a wrong answer is picked among options: the most similar one by word overlap, tf-idf or the paper's encoder.
SIMILARITIES = ("jaccard", "tfidf", "sentence-encoder")
