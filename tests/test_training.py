"""Recovery training: response-only labels, padding, the Trainer loop, distillation, resume. Tiny models, real
Trainer, a few steps each."""

from __future__ import annotations

import copy
import json
import string
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, get_peft_model
from safetensors.torch import load_file
from test_model import prune_half
from tiny_models import make_tiny_model
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from peft_restorelcc import RestoreLCCConfig
from peft_restorelcc.training.trainer import (
    IGNORE_INDEX,
    PaddingCollator,
    RecoveryTrainer,
    build_train_dataset,
    distillation_kl,
    read_jsonl,
    text_windows,
    token_kl,
    tokenize_chat,
    tokenize_instruction,
    train_adapter,
)

HEADS = {0: [1, 2], 1: [0, 3]}


def char_tokenizer(reverse: bool = False) -> PreTrainedTokenizerFast:
    """A real fast tokenizer, one token per character, whose ids fit the tiny models' vocabulary (97).
    ``reverse`` gives another tokenizer of the same size (the characters in reverse id order)."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    characters = " \n" + string.ascii_letters + string.digits + ".,;:!?'\"-()"
    characters = characters[::-1] if reverse else characters
    vocab = {token: index for index, token in enumerate(specials + list(characters))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()  # decode back to the text, not to space-separated characters
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


EXAMPLES = [
    {"prompt": "Question: What is red?\nAnswer:", "response": " fire"},
    {"prompt": "Question: Sky colour?\nAnswer:", "response": " blue"},
    {"prompt": "Question: Two plus two?\nAnswer:", "response": " four"},
    {"prompt": "Question: Opposite of up?\nAnswer:", "response": " down"},
]


def tiny_records(count: int = 8, seq_len: int = 24) -> list[dict]:
    """Instruction sequences of the char tokenizer: varied lengths, so batches need padding."""
    tokenizer = char_tokenizer()
    examples = [
        {"prompt": f"Q{i}: what comes after {i}?\nA:", "response": f" {i + 1} then {i + 2}"} for i in range(count)
    ]
    return [tokenize_instruction(example, tokenizer, seq_len) for example in examples]


def restorelcc_model(seed: int = 0, init_std: float = 1e-3):
    base = prune_half(make_tiny_model("llama"))
    torch.manual_seed(seed)
    config = RestoreLCCConfig(init_weights="gaussian", heads=HEADS, init_std=init_std, task_type="CAUSAL_LM")
    return get_peft_model(base, config)


@torch.no_grad()
def on_device_of(model, batch: dict) -> dict:
    # The Trainer moves a model to the GPU where there is one; the batches follow it.
    device = next(model.parameters()).device
    return {key: value.to(device) for key, value in batch.items()}


def batch_loss(model, records) -> float:
    batch = on_device_of(model, PaddingCollator(pad_token_id=0)(records))
    model.eval()
    return float(model(**batch).loss)


@torch.no_grad()
def batch_kl(student, teacher, records) -> float:
    batch = on_device_of(student, PaddingCollator(pad_token_id=0)(records))
    student.eval()
    labels = batch.pop("labels")
    return float(distillation_kl(student(**batch).logits, teacher(**batch).logits, labels))


def adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def test_instruction_labels_cover_the_response_and_eos_only() -> None:
    tokenizer = char_tokenizer()
    example = EXAMPLES[0]
    record = tokenize_instruction(example, tokenizer, max_length=64)
    prompt_length = len(tokenizer(example["prompt"])["input_ids"])
    assert record["labels"][:prompt_length] == [IGNORE_INDEX] * prompt_length
    response = record["labels"][prompt_length:]
    assert response == record["input_ids"][prompt_length:]
    assert response[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(response[:-1]) == " fire"
    assert tokenizer.decode(record["input_ids"][:prompt_length]) == example["prompt"]


def test_truncation_keeps_the_response_and_cuts_the_prompt_start() -> None:
    tokenizer = char_tokenizer()
    record = tokenize_instruction(EXAMPLES[0], tokenizer, max_length=10)
    assert len(record["input_ids"]) == 10
    assert tokenizer.decode(record["input_ids"]) == "wer: fire</s>"
    assert tokenizer.decode([t for t in record["labels"] if t != IGNORE_INDEX]) == " fire</s>"
    # A response longer than the window keeps its start and loses the prompt.
    long = tokenize_instruction({"prompt": "Q", "response": " abcdefgh"}, tokenizer, max_length=4)
    assert tokenizer.decode(long["input_ids"]) == " abc" and long["labels"] == long["input_ids"]
    # Nothing to learn (only position 0 labelled): dropped.
    assert tokenize_instruction({"prompt": "", "response": ""}, tokenizer, max_length=4) is None


def test_text_windows_are_fixed_length_and_fully_labelled() -> None:
    tokenizer = char_tokenizer()
    windows = text_windows(["abcdef", "ghij"], tokenizer, seq_len=4)
    stream = [*tokenizer("abcdef", add_special_tokens=False)["input_ids"], 2]
    stream += [*tokenizer("ghij", add_special_tokens=False)["input_ids"], 2]
    assert [w["input_ids"] for w in windows] == [stream[0:4], stream[4:8], stream[8:12]]
    assert all(w["labels"] == w["input_ids"] for w in windows)
    assert len(text_windows(["abcdef", "ghij"], tokenizer, seq_len=4, limit=1)) == 1


def test_collator_pads_right_with_minus_100_and_keeps_eos_equal_to_pad() -> None:
    features = [
        {"input_ids": [5, 6, 7, 2], "labels": [-100, -100, 7, 2]},
        {"input_ids": [8, 2], "labels": [8, 2]},
    ]
    batch = PaddingCollator(pad_token_id=2, pad_to_multiple_of=3)(features)  # pad id == EOS id, as in SmolLM2
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2, 2, 2], [8, 2, 2, 2, 2, 2]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 2, -100, -100], [8, 2, -100, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert all(tensor.dtype == torch.long for tensor in batch.values())


def test_jsonl_reads_instruction_and_text_lines_and_names_a_bad_line(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "Q?", "response": " a"}\n\n{"text": "plain words"}\n')
    assert read_jsonl(good) == ([{"prompt": "Q?", "response": " a"}], ["plain words"])
    dataset = build_train_dataset(str(good), char_tokenizer(), samples=None, seq_len=4)
    assert len(dataset) == 1 + len("plain words</s>".replace("</s>", "x")) // 4
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q?", "response": " a"}\n{"question": "Q?"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: row 2 has the fields \['question'\]; --data needs per row"):
        read_jsonl(bad)
    with pytest.raises(ValueError, match="neither one of"):
        build_train_dataset(str(tmp_path / "missing.jsonl"), char_tokenizer())


@pytest.mark.slow
def test_smollm2_tokenizer_mixed_data_trains_a_tiny_llama(tmp_path: Path) -> None:
    """The real SmolLM2 tokenizer (pad == EOS, no BOS) on the real instruction and text data, with a tiny Llama of
    the same vocabulary."""
    from peft_restorelcc.data import WIDE_TRAINING_SOURCES, instruction_and_cloze_examples, instruction_examples
    from peft_restorelcc.io import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    example = instruction_examples("train", limit=1, seed=3)[0]
    record = tokenize_instruction(example, tokenizer, max_length=128)
    labelled = [token for token in record["labels"] if token != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == example["response"] + tokenizer.eos_token
    prompt_ids = [i for i, label in zip(record["input_ids"], record["labels"]) if label == IGNORE_INDEX]
    assert tokenizer.decode(prompt_ids) == example["prompt"]

    dataset = build_train_dataset("mixed", tokenizer, samples=6, seq_len=32, seed=1)
    windows = [row for row in dataset if IGNORE_INDEX not in row["labels"]]
    assert len(dataset) == 6 and len(windows) == 3 and all(len(w["input_ids"]) == 32 for w in windows)
    assert dataset["input_ids"] == build_train_dataset("mixed", tokenizer, samples=6, seq_len=32, seed=1)["input_ids"]

    # --data instruction-wide: every pair of the wider sources as a response-only sequence. Nine PIQA solutions are
    # longer than the 128-token window by themselves; those keep the solution's start.
    wide_examples = instruction_examples("train", sources=WIDE_TRAINING_SOURCES)
    wide = build_train_dataset("instruction-wide", tokenizer, samples=None, seq_len=128)
    assert len(wide) == len(wide_examples) > len(instruction_examples("train"))
    full = {example["response"] + tokenizer.eos_token for example in wide_examples}
    responses = [tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX]) for row in wide]
    cut = [response for response in responses if response not in full]
    assert len(cut) == 9 and all(any(f.startswith(response) for f in full) for response in cut)

    # --data instruction-and-cloze (the default): the recipe's pairs and PIQA's and SciQ's without options, each once,
    # shuffled together; the same nine PIQA solutions outgrow the window.
    both_examples = instruction_and_cloze_examples("train", seed=2)
    both = build_train_dataset("instruction-and-cloze", tokenizer, samples=None, seq_len=128, seed=2)
    assert len(both) == len(both_examples) == len(wide_examples)
    full = [example["response"] + tokenizer.eos_token for example in both_examples]
    responses = [tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX]) for row in both]
    assert sum(response != answer for response, answer in zip(responses, full)) == 9
    assert all(answer.startswith(response) for response, answer in zip(responses, full))
    first = build_train_dataset("instruction-and-cloze", tokenizer, samples=50, seq_len=128, seed=2)
    assert first["input_ids"] == both["input_ids"][:50]

    # tiny_models.make_tiny_model fixes vocab_size=97, so the same tiny shape is built here with the real vocabulary.
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    model = get_peft_model(base, RestoreLCCConfig(task_type="CAUSAL_LM"))
    metrics = train_adapter(model, tokenizer, dataset, tmp_path, max_steps=2, batch_size=3, disable_tqdm=True)
    assert metrics["steps"] == 2 and torch.isfinite(torch.tensor(metrics["final_loss"]))
    assert (tmp_path / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


def test_restorelcc_training_lowers_the_loss_and_changes_only_m_and_b(tmp_path: Path) -> None:
    records = tiny_records()
    model = restorelcc_model()
    before_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    before = batch_loss(model, records)
    metrics = train_adapter(
        model, None, records, tmp_path, max_steps=8, batch_size=8, learning_rate=5e-2, shuffle=False,
        logging_steps=1, disable_tqdm=True,
    )  # fmt: skip
    after = batch_loss(model, records)
    assert after < before - 0.05, (before, after)
    changed = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before_state[name])}
    assert changed and all("restorelcc_magnitude" in name or "restorelcc_bias" in name for name in changed)
    assert len(changed) == 4  # m and b of the two wrapped layers
    assert metrics["steps"] == 8 and metrics["final_loss"] < metrics["train_loss"] + 1e-6
    assert metrics["trainable_parameters"] == 4 * 2 * 8 and metrics["seconds_per_step"] > 0
    saved = adapter_tensors(tmp_path)
    assert any(key.endswith("restorelcc_basis") for key in saved)
    assert all(torch.isfinite(tensor).all() for tensor in saved.values())


@pytest.mark.parametrize(
    "config",
    [LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"), IA3Config(task_type="CAUSAL_LM")],
    ids=["lora", "ia3"],
)
def test_other_peft_types_train_through_the_same_function(tmp_path: Path, config) -> None:
    model = get_peft_model(prune_half(make_tiny_model("llama")), copy.deepcopy(config))
    metrics = train_adapter(model, None, tiny_records(4), tmp_path, max_steps=2, batch_size=2, disable_tqdm=True)
    assert metrics["steps"] == 2 and (tmp_path / "adapter_config.json").is_file()


def test_same_seed_gives_the_same_adapter(tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b"):
        train_adapter(restorelcc_model(), None, tiny_records(), tmp_path / name, max_steps=3, batch_size=4,
                      learning_rate=1e-2, seed=5, disable_tqdm=True)  # fmt: skip
        runs.append(adapter_tensors(tmp_path / name))
    assert runs[0].keys() == runs[1].keys()
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


def test_resume_from_a_checkpoint_ends_where_the_uninterrupted_run_ends(tmp_path: Path) -> None:
    settings = dict(max_steps=6, batch_size=2, learning_rate=1e-2, save_steps=3, seed=2, disable_tqdm=True)
    records = tiny_records()
    train_adapter(restorelcc_model(), None, records, tmp_path / "full", **settings)
    assert (tmp_path / "full" / "checkpoint-3" / "trainer_state.json").is_file()
    # A fresh process would rebuild the model from the same adapter; the checkpoint then supplies the state.
    metrics = train_adapter(
        restorelcc_model(seed=99), None, records, tmp_path / "resumed",
        resume_from_checkpoint=tmp_path / "full" / "checkpoint-3", **settings,
    )  # fmt: skip
    assert metrics["steps"] == 6 and metrics["steps_this_run"] == 3
    full, resumed = adapter_tensors(tmp_path / "full"), adapter_tensors(tmp_path / "resumed")
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=1e-5, atol=1e-6)


def test_bad_training_arguments_are_refused(tmp_path: Path) -> None:
    model = restorelcc_model()
    with pytest.raises(ValueError, match="learning_rate must be a positive number"):
        train_adapter(model, None, tiny_records(2), tmp_path, learning_rate=-1.0)
    with pytest.raises(ValueError, match="max_steps must be a positive number"):
        train_adapter(model, None, tiny_records(2), tmp_path, max_steps=-5)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train_adapter(make_tiny_model("llama").requires_grad_(False), None, tiny_records(2), tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Distillation
# ---------------------------------------------------------------------------------------------------------------


def test_kl_is_zero_for_the_same_model_and_positive_otherwise() -> None:
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, -100]])
    assert float(distillation_kl(logits, logits.clone(), labels)) == pytest.approx(0.0, abs=1e-6)
    other = logits + torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    assert float(distillation_kl(logits, other, labels)) > 1e-3
    # Only positions that predict a labelled token count: differences elsewhere change nothing.
    elsewhere = logits.clone()
    elsewhere[0, 0] += 5.0
    elsewhere[1, 3:] += 5.0
    assert float(distillation_kl(logits, elsewhere, labels)) == pytest.approx(0.0, abs=1e-6)
    # T^2 scaling: a softer temperature does not shrink the KL to nothing.
    assert float(token_kl(logits[0], other[0], temperature=4.0).mean()) > 1e-3
    with pytest.raises(ValueError, match="same vocabulary"):
        token_kl(logits[0], logits[0, :, :5])


def test_trainer_loss_with_the_student_as_teacher_is_zero(tmp_path: Path) -> None:
    from transformers import TrainingArguments

    student = restorelcc_model(init_std=0.1)
    teacher = copy.deepcopy(student).merge_and_unload()
    arguments = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = RecoveryTrainer(model=student, args=arguments, teacher=teacher, distill_alpha=1.0)
    batch = PaddingCollator(pad_token_id=0)(tiny_records(3))
    student.eval()
    assert float(trainer.compute_loss(student, batch).detach()) == pytest.approx(0.0, abs=1e-6)
    assert not any(parameter.requires_grad for parameter in teacher.parameters()) and not teacher.training
    mixed = RecoveryTrainer(model=student, args=arguments, teacher=make_tiny_model("llama"), distill_alpha=0.0)
    torch.testing.assert_close(mixed.compute_loss(student, dict(batch)), student(**batch).loss)


def test_distillation_lowers_the_kl_to_the_dense_model(tmp_path: Path) -> None:
    dense = make_tiny_model("llama")
    records = tiny_records()
    student = restorelcc_model()
    before = batch_kl(student, dense, records)
    metrics = train_adapter(
        student, None, records, tmp_path, max_steps=8, batch_size=8, learning_rate=1e-2, shuffle=False,
        teacher=dense, distill_alpha=1.0, temperature=2.0, logging_steps=1, disable_tqdm=True,
    )  # fmt: skip
    after = batch_kl(student, dense, records)
    assert after < 0.6 * before, (before, after)
    assert metrics["distillation"]["alpha"] == 1.0 and "distill_kl" in metrics["distillation"]
    # The teacher is not saved with the adapter and was not trained.
    assert all(key.startswith("base_model.model.") and "restorelcc_" in key for key in adapter_tensors(tmp_path))
    dense_weights = {name: tensor.cpu() for name, tensor in dense.state_dict().items()}
    torch.testing.assert_close(dense_weights, make_tiny_model("llama").state_dict(), rtol=0, atol=0)


# A chat template in the style of ChatML, written with the characters the char tokenizer knows.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def test_chat_rows_are_labelled_on_the_last_reply_only() -> None:
    tokenizer = char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    messages = [
        {"role": "user", "content": "Sky?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Grass?"},
        {"role": "assistant", "content": "Green."},
    ]
    record = tokenize_chat(messages, tokenizer, max_length=200)
    prompt = "user: Sky?\nassistant: Blue.\nuser: Grass?\nassistant:"
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(prompt + " Green.\n", add_special_tokens=False)["input_ids"]
    assert record["input_ids"] == full_ids
    assert record["labels"] == [IGNORE_INDEX] * len(prompt_ids) + full_ids[len(prompt_ids) :]
    # Too long: the prompt loses its start, the reply is kept.
    short = tokenize_chat(messages, tokenizer, max_length=12)
    assert short["input_ids"] == full_ids[-12:] and short["labels"][-8:] == full_ids[-8:]
    with pytest.raises(ValueError, match="need a tokenizer with a chat template"):
        tokenize_chat(messages, char_tokenizer(), max_length=200)


def test_alpaca_and_chat_files_train_on_the_response_only(tmp_path: Path) -> None:
    from peft_restorelcc.data.user import ALPACA_PROMPT

    tokenizer = char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    chat = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yo."}]
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        '{"instruction": "Say it.", "input": "a", "output": "ok"}\n' + json.dumps({"messages": chat}) + "\n"
    )
    dataset = build_train_dataset(str(path), tokenizer, samples=None, seq_len=400)
    alpaca_prompt = tokenizer(ALPACA_PROMPT.format(instruction="Say it.", input="a"))["input_ids"]
    chat_prompt = tokenizer("user: Hi?\nassistant:", add_special_tokens=False)["input_ids"]
    records = sorted(dataset, key=lambda record: len(record["input_ids"]))
    chat_record, alpaca_record = records
    for record, prompt_ids in ((alpaca_record, alpaca_prompt), (chat_record, chat_prompt)):
        assert record["input_ids"][: len(prompt_ids)] == prompt_ids
        assert record["labels"] == [IGNORE_INDEX] * len(prompt_ids) + record["input_ids"][len(prompt_ids) :]
    assert tokenizer.decode(alpaca_record["input_ids"][len(alpaca_prompt) :]) == "ok</s>"
    assert tokenizer.decode(chat_record["input_ids"][len(chat_prompt) :]) == " Yo.\n"


def test_task_data_trains_on_the_tasks_training_side_only() -> None:
    from peft_restorelcc import data

    tokenizer = char_tokenizer()
    dataset = build_train_dataset("task:arc_easy", tokenizer, samples=5, seq_len=400, seed=1)
    expected = data.task_examples("arc_easy", seed=1, limit=5)
    for record, example in zip(dataset, expected):
        prompt_ids = tokenizer(example["prompt"])["input_ids"]
        assert record["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
        assert tokenizer.decode(record["input_ids"][len(prompt_ids) :]).replace("<unk>", "?") != ""
    with pytest.raises(ValueError, match="unknown task 'piqa'"):
        build_train_dataset("task:piqa", tokenizer)
