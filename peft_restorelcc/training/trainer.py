"""Recovery training of a PEFT adapter on a pruned model: data, padding, distillation from the dense model, Trainer.

Everything here works for any PEFT model (RestoreLCC, LoRA, IA3, ...): only the adapter's trainable parameters
change, and the Trainer does the rest.

Data. Instruction examples (``{"prompt", "response"}``) become one sequence ``prompt + response + EOS`` whose
labels are ``-100`` on the prompt, so the loss covers the response (and the EOS that ends it) only, as the paper
trains on Alpaca. Plain text is joined with EOS into one token stream and cut into fixed windows whose every token
is a target. The collator pads on the right: ids with the pad token, labels with ``-100``, attention mask 0.

Loss. Without a teacher: the model's own next-token cross entropy. With a teacher (the dense model, which recovery
always has at hand): ``alpha * KL(teacher || student) + (1 - alpha) * LM`` over the labelled next-token positions,
the KL on temperature-softened distributions and scaled by ``T^2`` so its gradients keep their size as ``T``
changes. Both terms are sums over tokens divided by the number of labelled tokens in the whole global batch (all
processes, all accumulation steps), as the Trainer does for its own loss, so 2 processes x batch 2 take the same
step as 1 process x batch 4.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import statistics
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments

from .. import data as data_module
from ..data.choices import FILE_SUFFIXES, TRAINING_HELP
from ..data.user import hub_dataset, read_training_file
from ..io.adapters import write_base_record
from ..io.files import DiskFullError, is_disk_full
from .choices import DATA_CHOICES, PAPER_BATCH_SIZE, PAPER_EPOCHS, PAPER_LEARNING_RATE, PAPER_SAMPLES, TASK_DATA_PREFIX
from .logits import (
    TRAINING_CHUNK_BYTES,
    TRAINING_CHUNK_THRESHOLD,
    chunked_head_loss,
    head_inputs_at,
    head_logits,
    head_logits_match,
    lm_head_at,
    next_token_targets,
    output_head,
    token_kl,
)

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------------------------
# Tokenisation
# ----------------------------------------------------------------------------------------------------------------


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(
            "The tokenizer has no EOS token; training appends EOS to every response and between text passages. "
            "Set tokenizer.eos_token before training."
        )
    return int(eos)


def tokenize_instruction(
    example: Mapping[str, str], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> dict[str, list[int]] | None:
    """``prompt + response + EOS`` as ids, with labels ``-100`` on the prompt; None if nothing is left to learn.

    The prompt is tokenized alone and the full text as a whole, and the response is the whole's tail after the
    prompt's ids (as lm-eval splits context and continuation), so the model trains on the tokens it is scored on.
    When the prompt's ids are not a prefix of the whole's (a merge across the boundary), the two parts are tokenized
    separately instead. Too long: the prompt loses tokens from its start; a response longer than ``max_length`` is
    cut at its end.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (an input and a target), got {max_length}.")
    prompt, response = example["prompt"], example["response"]
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    full_ids = list(tokenizer(prompt + response)["input_ids"])
    if full_ids[: len(prompt_ids)] == prompt_ids:
        response_ids = full_ids[len(prompt_ids) :]
    else:
        response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    eos = _eos_id(tokenizer)
    if not response_ids or response_ids[-1] != eos:
        response_ids.append(eos)
    return _prompt_and_response(prompt_ids, response_ids, max_length)


def _prompt_and_response(
    prompt_ids: list[int], response_ids: list[int], max_length: int
) -> dict[str, list[int]] | None:
    """One sequence, labels ``-100`` on the prompt. Too long: the prompt loses tokens from its start; a response
    longer than ``max_length`` is cut at its end. None if nothing is left to learn."""
    response_ids = response_ids[:max_length]
    room = max_length - len(response_ids)
    prompt_ids = prompt_ids[-room:] if room else []
    input_ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    # Position 0 is never a target (nothing predicts it): a sequence needs a labelled token after the first.
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return {"input_ids": input_ids, "labels": labels}


def tokenize_chat(
    messages: Sequence[Mapping[str, str]], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> dict[str, list[int]] | None:
    """A chat rendered with the tokenizer's chat template, labels ``-100`` on everything before the last (assistant)
    turn's content: the prompt is the template of the earlier turns with the generation prompt, exactly what the
    model sees before it answers. The template's own end-of-turn closes the response (no EOS is added)."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (an input and a target), got {max_length}.")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "Chat rows ('messages') need a tokenizer with a chat template, and this one has none: write the rows as "
            "prompt/response instead, or use the tokenizer of an instruct model."
        )
    messages = [dict(message) for message in messages]
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("The chat template renders the earlier turns differently once the reply follows them.")
    # The template writes the special tokens itself: add none.
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    full_ids = list(tokenizer(full, add_special_tokens=False)["input_ids"])
    if full_ids[: len(prompt_ids)] == prompt_ids:
        response_ids = full_ids[len(prompt_ids) :]
    else:
        response_ids = list(tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"])
    return _prompt_and_response(prompt_ids, response_ids, max_length)


def text_windows(
    texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, seq_len: int, limit: int | None = None
) -> list[dict[str, list[int]]]:
    """Non-overlapping ``seq_len`` windows of the texts joined by EOS into one stream; every token is a target.

    Texts are consumed lazily, so asking for a few windows does not tokenize a whole corpus. The incomplete last
    window is dropped.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}.")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be None or >= 0, got {limit}.")
    eos = _eos_id(tokenizer)
    windows: list[dict[str, list[int]]] = []
    stream: list[int] = []
    for text in texts:
        if limit is not None and len(windows) >= limit:
            break
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        stream.append(eos)
        start = 0
        while len(stream) - start >= seq_len and (limit is None or len(windows) < limit):
            window = stream[start : start + seq_len]
            windows.append({"input_ids": window, "labels": list(window)})
            start += seq_len
        del stream[:start]  # once per text, so a long text is not copied once per window
    return windows


def instruction_records(
    examples: Iterable[Mapping[str, str]], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[dict[str, list[int]]]:
    """``tokenize_instruction`` over examples, dropping those with nothing to learn."""
    records = (tokenize_instruction(example, tokenizer, max_length) for example in examples)
    return [record for record in records if record is not None]


def read_jsonl(path: str | os.PathLike) -> tuple[list[dict[str, str]], list[str]]:
    """``(instruction examples, texts)`` from a data file (``user_data.read_training_file``: prompt/response and
    Alpaca rows as examples, text rows as texts); chats are refused here (they need a tokenizer)."""
    read = read_training_file(path)
    if read.chats:
        raise ValueError(f"{path} holds chat rows ('messages'): read it with user_data.read_training_file.")
    return read.examples, read.texts


def check_data_choice(data: str) -> None:
    """ValueError unless ``data`` is a known source, ``task:NAME`` of a bundled evaluation task, an existing file
    or ``datasets`` directory, or a Hub dataset id ``org/name[:split]`` (cheap: reads nothing, asks no Hub)."""
    if data in DATA_CHOICES:
        return
    if data.startswith(TASK_DATA_PREFIX):
        task = data[len(TASK_DATA_PREFIX) :]
        if task not in data_module.EVAL_TASKS:
            raise ValueError(
                f"--data {data!r}: unknown task {task!r}; use task:NAME with NAME one of "
                f"{', '.join(data_module.EVAL_TASKS)} (its items after the ones evaluation scores)."
            )
        return
    if hub_dataset(data) is not None:
        return
    path = Path(data).expanduser()
    if not path.exists():
        raise ValueError(
            f"--data {data!r} is neither one of {list(DATA_CHOICES)}, nor task:NAME, nor an existing file, nor a Hub "
            f"dataset id org/name[:split]: pass a source name, a Hub id or the path of a {'/'.join(FILE_SUFFIXES)} "
            f"file (or a datasets.save_to_disk directory) with {TRAINING_HELP}."
        )
    if path.is_file() and path.suffix.lower() not in FILE_SUFFIXES:
        raise ValueError(
            f"--data {data}: unknown format {path.suffix or '(no suffix)'}; use {', '.join(FILE_SUFFIXES)}."
        )


def check_data_source(data: str) -> None:
    """``check_data_choice``, and a Hub dataset read now (``datasets`` keeps it in its cache for the training that
    follows): a missing or unreachable dataset, or rows of no known schema, fail with one line before any model
    loads."""
    check_data_choice(data)
    if hub_dataset(data) is not None:
        read_training_file(data)


def _bundled_records(
    data: str, tokenizer: PreTrainedTokenizerBase, samples: int | None, seq_len: int, seed: int, rng: random.Random
) -> list[dict[str, list[int]]]:
    """The sequences of one of ``DATA_CHOICES``, from the bundled sets."""
    half = None if samples is None else samples // 2
    wanted_instruction = {"instruction": samples, "instruction-wide": samples, "text": 0, "mixed": half}
    sources = data_module.WIDE_TRAINING_SOURCES if data == "instruction-wide" else data_module.TRAINING_SOURCES
    records: list[dict[str, list[int]]] = []
    if data == "instruction-and-cloze":
        examples = data_module.instruction_and_cloze_examples("train", samples, seed)
    elif data != "text":
        examples = data_module.instruction_examples("train", wanted_instruction[data], seed, sources)
    if data != "text":
        records += instruction_records(examples, tokenizer, seq_len)
    if data in ("text", "mixed"):
        passages = data_module.text_passages("train")
        rng.shuffle(passages)
        limit = None if samples is None else samples - len(records)
        records += text_windows(passages, tokenizer, seq_len, limit)
    return records


def _file_records(
    data: str, tokenizer: PreTrainedTokenizerBase, samples: int | None, seq_len: int, rng: random.Random
) -> list[dict[str, list[int]]]:
    """The sequences of the user's file, directory or Hub dataset, in a seeded order."""
    read = read_training_file(data)
    rng.shuffle(read.examples)
    rng.shuffle(read.chats)
    rng.shuffle(read.texts)
    chats = (tokenize_chat(messages, tokenizer, seq_len) for messages in read.chats)
    records = instruction_records(read.examples, tokenizer, seq_len) + [r for r in chats if r is not None]
    records += text_windows(read.texts, tokenizer, seq_len)
    rng.shuffle(records)
    return records if samples is None else records[:samples]


def build_train_dataset(
    data: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    samples: int | None = PAPER_SAMPLES,
    seq_len: int = 128,
    seed: int = 0,
) -> datasets.Dataset:
    """Tokenized training sequences (``input_ids``, ``labels``) from a data choice.

    - ``"instruction"``: ``data.instruction_examples("train")`` (question with options -> answer), response-only loss.
    - ``"instruction-wide"``: the same from ``data.WIDE_TRAINING_SOURCES`` (PIQA and SciQ too, about twice the pairs).
    - ``"instruction-and-cloze"``: ``data.instruction_and_cloze_examples("train")``, the default's pairs and PIQA's
      and SciQ's in the cloze form (question -> answer, no options), shuffled together; response-only loss.
    - ``"text"``: LAMBADA train passages cut into ``seq_len`` windows, loss on every token.
    - ``"mixed"``: half of each, interleaved in a seeded order.
    - ``"task:NAME"``: a bundled evaluation task's training-side items (``data.task_examples``: never one that
      evaluation scores), its prompt -> the right choice, response-only loss.
    - a file (``.jsonl``, ``.json``, ``.csv``) or ``datasets.save_to_disk`` directory (``user_data.TRAINING_HELP``):
      prompt/response and Alpaca rows as instruction data, chat rows through the chat template (loss on the last
      reply), text rows as windows; the same from a Hub dataset ``org/name[:split]`` where no such path exists.

    ``samples`` is the number of sequences (None: all there are); ``seed`` picks and orders them.
    """
    check_data_choice(data)
    if samples is not None and samples < 1:
        raise ValueError(f"samples must be >= 1 (or None for all), got {samples}.")
    rng = random.Random(seed)
    if data in DATA_CHOICES:
        records = _bundled_records(data, tokenizer, samples, seq_len, seed, rng)
    elif data.startswith(TASK_DATA_PREFIX):
        examples = data_module.task_examples(data[len(TASK_DATA_PREFIX) :], seed=seed, limit=samples)
        records = instruction_records(examples, tokenizer, seq_len)
    else:
        records = _file_records(data, tokenizer, samples, seq_len, rng)
    if data == "mixed":
        rng.shuffle(records)
    if not records:
        raise ValueError(f"--data {data!r} gave no training sequences at --seq-len {seq_len}: add data or lower it.")
    return datasets.Dataset.from_list(records)


# ----------------------------------------------------------------------------------------------------------------
# Padding
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class PaddingCollator:
    """Right-pads a list of ``{"input_ids", "labels"}`` features into a batch of tensors.

    ``labels`` are padded with ``-100`` by position, never derived from the ids: a pad token equal to EOS (as in
    SmolLM2) would otherwise erase the EOS targets. ``attention_mask`` is 1 on real tokens.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("Cannot collate an empty batch.")
        length = max(len(feature["input_ids"]) for feature in features)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(features), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), length), dtype=torch.long)
        for row, feature in enumerate(features):
            ids = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            n = ids.numel()
            input_ids[row, :n] = ids
            labels[row, :n] = torch.as_tensor(feature.get("labels", feature["input_ids"]), dtype=torch.long)
            attention_mask[row, :n] = (
                torch.as_tensor(feature["attention_mask"], dtype=torch.long) if "attention_mask" in feature else 1
            )
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pad_token_id_of(tokenizer: PreTrainedTokenizerBase | None) -> int:
    """The pad id for the collator: the tokenizer's pad, else its EOS, else 0 (the mask hides it either way)."""
    for attribute in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attribute, None) if tokenizer is not None else None
        if value is not None:
            return int(value)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Distillation
# ----------------------------------------------------------------------------------------------------------------


def labelled_positions(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits rows, targets, mask)`` of the positions that predict a labelled next token.

    ``logits`` may be longer than ``labels`` (prompt-learning methods prepend virtual tokens): its last
    ``labels.shape[1]`` positions are the ones aligned with the labels.
    """
    logits = logits[:, -labels.shape[1] :]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return logits[:, :-1][mask], targets[mask], mask


def distillation_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Mean ``token_kl`` over the positions that predict a labelled token (batch x seq x vocab logits)."""
    student_rows, _, mask = labelled_positions(student_logits, labels)
    teacher_rows, _, _ = labelled_positions(teacher_logits, labels)
    if not mask.any():
        return student_logits.new_zeros((), dtype=torch.float32)
    return token_kl(student_rows, teacher_rows, temperature).mean()


class NonFiniteTraining(ValueError):
    """Training met a NaN/inf loss or gradient and stopped before writing an adapter."""


CHECKPOINT_MARKER = "restorelcc_checkpoint.json"


class _CheckpointMarker(TrainerCallback):
    """Writes ``CHECKPOINT_MARKER`` into every checkpoint this package saves: ``restorelcc train --resume`` continues
    only such a directory, never an adapter or model a user passed in."""

    def on_save(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir():
            (checkpoint / CHECKPOINT_MARKER).write_text(
                json.dumps({"written_by": "peft_restorelcc", "global_step": state.global_step}) + "\n"
            )


@contextmanager
def _disk_full_as_one_line(checkpoint_dir: Path) -> Iterator[None]:
    """A full disk while the Trainer writes a checkpoint: the checkpoint it was writing (no marker yet) is removed,
    the finished ones stay (``--resume`` continues from the last), and the error is one ``DiskFullError`` line."""
    try:
        yield
    except Exception as error:
        if not is_disk_full(error):
            raise
        for checkpoint in checkpoint_dir.glob("checkpoint-*"):
            if checkpoint.is_dir() and not (checkpoint / CHECKPOINT_MARKER).is_file():
                shutil.rmtree(checkpoint, ignore_errors=True)
        raise DiskFullError(checkpoint_dir) from None


def save_adapter(model: nn.Module, output_dir: str | os.PathLike) -> Path:
    """``model.save_pretrained(output_dir)`` and the base record (``io.write_base_record``), all or nothing: on a full disk the adapter files it began to write are
    removed (what was in ``output_dir`` before, checkpoints included, stays) and the error is a ``DiskFullError``."""
    output_dir = Path(output_dir)
    before = set(output_dir.iterdir()) if output_dir.is_dir() else set()
    try:
        model.save_pretrained(str(output_dir))
        write_base_record(output_dir, model)
    except Exception as error:
        if not is_disk_full(error):
            raise
        for entry in set(output_dir.iterdir()) - before:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        raise DiskFullError(output_dir, needed=trainable) from None
    return output_dir


class RecoveryTrainer(Trainer):
    """A Trainer that can distil from a frozen teacher: ``alpha * KL + (1 - alpha) * LM`` on labelled positions.

    The teacher is a plain attribute, not part of ``self.model``: it is neither wrapped by DDP nor saved in
    checkpoints. It stays in eval mode without gradients, on the student's device. Without a teacher this is the
    stock Trainer.
    """

    def __init__(
        self,
        *args: Any,
        teacher: nn.Module | None = None,
        distill_alpha: float = 1.0,
        temperature: float = 1.0,
        head_chunk_threshold: int = TRAINING_CHUNK_THRESHOLD,
        head_chunk_bytes: int = TRAINING_CHUNK_BYTES,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not 0.0 <= distill_alpha <= 1.0:
            raise ValueError(f"distill_alpha must be in [0, 1], got {distill_alpha}.")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.teacher = teacher
        self.distill_alpha = distill_alpha
        self.temperature = temperature
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            teacher.to(self.args.device)
        # Per-process sums since the last log, for "distill_kl" and "lm_loss" in the logs.
        self._log_sums = {"kl": 0.0, "lm": 0.0, "tokens": 0}
        self._batches_seen = 0
        # A step whose labelled positions would need more fp32 logit bytes than head_chunk_threshold runs the head
        # head_chunk_bytes of logits at a time (chunked_head_loss): plain-text data labels every token.
        self.head_chunk_threshold = head_chunk_threshold
        self.head_chunk_bytes = head_chunk_bytes

    def training_step(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        """The stock step, then a stop (``NonFiniteTraining``, one line naming the step and the batch) as soon as the
        loss or a trainable gradient is NaN/inf: nothing that follows could be trusted, and no adapter is saved."""
        batch = self._batches_seen
        self._batches_seen += 1
        loss = super().training_step(model, inputs, *args, **kwargs)
        step = self.state.global_step + 1
        if not bool(torch.isfinite(loss.detach()).all()):
            raise NonFiniteTraining(
                f"the training loss is {float(loss.detach().float().mean())} at step {step} (batch {batch} of this "
                "run): stopped, no adapter written. Check the base model for NaN/inf weights (or a dtype that "
                "overflows, e.g. float16: try --dtype float32) and lower --lr."
            )
        for name, parameter in model.named_parameters():
            if parameter.grad is not None and not bool(torch.isfinite(parameter.grad).all()):
                raise NonFiniteTraining(
                    f"a non-finite gradient of {name} at step {step} (batch {batch} of this run): stopped, no adapter "
                    "written. Lower --lr, or check the data and the base model's weights."
                )
        return loss

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        if "labels" not in inputs or self.label_smoother is not None or self.compute_loss_func is not None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        positions, targets = next_token_targets(inputs["labels"])
        sums = None if return_outputs else self._chunked_sums(model, inputs, positions, targets)
        if sums is not None:
            outputs, (loss_sum, lm_sum, kl_sum) = None, sums
        else:
            outputs, student_rows, positions, targets = self._labelled_rows(model, inputs, return_outputs)
            if self.teacher is None:
                kl_sum, alpha = None, 0.0
            else:
                model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
                with torch.no_grad(), lm_head_at(self.teacher, positions):
                    teacher_rows = self.teacher(**model_inputs).logits[0]
                kl_sum, alpha = token_kl(student_rows, teacher_rows, self.temperature).sum(), self.distill_alpha
            # The LM term is computed even at alpha=1 (without a graph) so that the logs show both.
            with torch.set_grad_enabled(torch.is_grad_enabled() and alpha < 1.0):
                lm_sum = F.cross_entropy(student_rows.float(), targets, reduction="sum")
            loss_sum = lm_sum if kl_sum is None else alpha * kl_sum + (1.0 - alpha) * lm_sum
        if num_items_in_batch is not None:
            # Normalised over the global batch as the Trainer normalises its own loss; DDP then averages the
            # gradients over processes, which the scale by the process count undoes.
            loss = loss_sum / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
            self.loss_is_scaled_for_ga = True
        else:
            loss = loss_sum / positions.sum().clamp(min=1)
            self.loss_is_scaled_for_ga = False
        if model.training and kl_sum is not None:
            self._log_sums["kl"] += float(kl_sum.detach())
            self._log_sums["lm"] += float(lm_sum.detach())
            self._log_sums["tokens"] += int(positions.sum())
        return (loss, outputs) if return_outputs else loss

    def _chunked_sums(
        self, model: nn.Module, inputs: dict[str, Any], positions: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """``(loss sum, LM sum, KL sum)`` with the head run a chunk of rows at a time, or None when the step's logits
        are small enough for one call, or when the model applies something after its head that ``head_logits`` does
        not reproduce (then, once, a warning, and every later step takes the one-call path)."""
        vocab = output_head(model).weight.shape[0]
        chunk_bytes = self.head_chunk_bytes
        if self.head_chunk_threshold is None or int(positions.sum()) * vocab * 4 <= self.head_chunk_threshold:
            return None
        model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        with head_inputs_at(model, positions) as student:
            own_rows = model(**model_inputs).logits[0]
        logits_of = head_logits(model)
        teacher = teacher_logits_of = None
        if self.teacher is not None:
            teacher_logits_of = head_logits(self.teacher)
            with torch.no_grad(), head_inputs_at(self.teacher, positions) as teacher:
                teacher_own_rows = self.teacher(**model_inputs).logits[0]
        with torch.no_grad():
            reproduced = head_logits_match(own_rows, logits_of(student.hidden[: student.check_rows])) and (
                teacher is None
                or head_logits_match(teacher_own_rows, teacher_logits_of(teacher.hidden[: teacher.check_rows]))
            )
        if not reproduced:
            warnings.warn(
                f"{type(getattr(model, 'module', model)).__name__} changes its logits after the output embeddings in a "
                "way the chunked loss does not reproduce: every step computes the head in one call instead.",
                RuntimeWarning,
                stacklevel=2,
            )
            self.head_chunk_threshold = None
            return None
        return chunked_head_loss(
            logits_of, student.hidden, targets, teacher_logits_of=teacher_logits_of,
            teacher_hidden=None if teacher is None else teacher.hidden,
            alpha=self.distill_alpha if teacher is not None else 0.0, temperature=self.temperature,
            chunk_rows=max(1, chunk_bytes // (vocab * 4)),
        )  # fmt: skip

    @staticmethod
    def _labelled_rows(
        model: nn.Module, inputs: dict[str, Any], full_logits: bool
    ) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(outputs, logits rows, positions, targets)`` of the positions that predict a labelled token.

        The head runs at those positions only: the same loss as the model's own (a sum over the same tokens), without
        batch x sequence x vocabulary logits for prompt tokens that carry no label. ``full_logits`` keeps the whole
        logits in ``outputs`` for a caller that reads them (the Trainer's prediction step).
        """
        labels = inputs["labels"]
        positions, targets = next_token_targets(labels)
        model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        with nullcontext() if full_logits else lm_head_at(model, positions):
            outputs = model(**model_inputs)
        rows = labelled_positions(outputs.logits, labels)[0] if full_logits else outputs.logits[0]
        return outputs, rows, positions, targets

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.teacher is not None and "loss" in logs and self._log_sums["tokens"]:
            logs["distill_kl"] = round(self._log_sums["kl"] / self._log_sums["tokens"], 6)
            logs["lm_loss"] = round(self._log_sums["lm"] / self._log_sums["tokens"], 6)
            self._log_sums = {"kl": 0.0, "lm": 0.0, "tokens": 0}
        super().log(logs, start_time)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


class _StepTimer(TrainerCallback):
    """Wall and process CPU time of every optimizer step of this run, and the step it started from (non-zero after
    a resume). CPU time (all threads of this process) is what a step costs even when other processes compete for
    the cores, where wall time is not."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.first_step: int | None = None
        self._started = (0.0, 0.0)

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.first_step = state.global_step

    def on_step_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self._started = (time.perf_counter(), time.process_time())

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.wall.append(time.perf_counter() - self._started[0])
        self.cpu.append(time.process_time() - self._started[1])


def _check_training_args(
    epochs: float, learning_rate: float, batch_size: int, gradient_accumulation_steps: int, max_steps: int,
    save_steps: int, logging_steps: int,
) -> None:  # fmt: skip
    problems = []
    if not (learning_rate > 0 and math.isfinite(learning_rate)):
        problems.append(f"learning_rate must be a positive number, got {learning_rate}")
    if not epochs > 0:
        problems.append(f"epochs must be > 0, got {epochs}")
    if batch_size < 1 or gradient_accumulation_steps < 1:
        problems.append(f"batch_size and gradient_accumulation_steps must be >= 1, got {batch_size}, "
                        f"{gradient_accumulation_steps}")  # fmt: skip
    if max_steps == 0 or max_steps < -1:
        problems.append(f"max_steps must be a positive number of steps, or -1 to train for the epochs, got {max_steps}")
    if save_steps < 1 or logging_steps < 1:
        problems.append(f"save_steps and logging_steps must be >= 1, got {save_steps}, {logging_steps}")
    if problems:
        raise ValueError("; ".join(problems) + ".")


def peak_memory_mb() -> dict[str, float]:
    """Peak memory of this process: CUDA allocations when on a GPU, and the resident set size since the process
    started, model loading included (an upper bound of what training needs), or since the kernel's peak counter was
    last reset: under ``restorelcc run`` that is the start of the train stage (``recovery.StageTimer``)."""
    peaks = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        peaks["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peaks


# Long on purpose, for now: its keyword arguments are the recipe, handed to TrainingArguments one by one. Folding
# them into one recipe object changes the signature that pipeline, compare, the CLI and the benchmarks call.
def train_adapter(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    train_dataset: datasets.Dataset | Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    *,
    epochs: float = PAPER_EPOCHS,
    learning_rate: float = PAPER_LEARNING_RATE,
    batch_size: int = PAPER_BATCH_SIZE,
    gradient_accumulation_steps: int = 1,
    max_steps: int = -1,
    seed: int = 0,
    teacher: nn.Module | None = None,
    distill_alpha: float = 1.0,
    temperature: float = 1.0,
    resume_from_checkpoint: str | os.PathLike | bool | None = None,
    save_steps: int = 500,
    save_total_limit: int | None = 2,
    logging_steps: int = 10,
    shuffle: bool = True,
    lr_scheduler_type: str = "linear",
    warmup: float = 0.0,
    disable_tqdm: bool | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    device: str | torch.device | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train the trainable parameters of a PEFT model with the HF Trainer and save the adapter to ``output_dir``.

    Works for any PEFT model; only its trainable parameters (for RestoreLCC: m and b) are optimised (AdamW, no
    weight decay, linear decay). ``batch_size`` is per process; the global batch is ``batch_size x processes x
    gradient_accumulation_steps``. Checkpoints (adapter, optimizer, scheduler, RNG) go to
    ``output_dir/checkpoint-<step>`` (``checkpoint_dir/checkpoint-<step>`` when given) every ``save_steps``;
    ``resume_from_checkpoint`` (a path, or True for the latest in that directory) continues from one, and with the same arguments ends where an uninterrupted run ends. With a
    ``teacher`` the loss is ``distill_alpha * KL(teacher || student) + (1 - distill_alpha) * LM`` (temperature
    ``temperature``). Shuffling is seeded, and one permutation is shared by all processes, so N processes x batch B
    see the same global batches as 1 process x batch N*B; ``shuffle=False`` feeds the data in file order.

    The adapter (``save_pretrained``) is written by the main process only. Returns the train metrics: ``seconds``,
    ``steps`` (the global step reached), ``steps_this_run``, ``seconds_per_step`` and ``cpu_seconds_per_step``
    (medians over the optimizer steps of wall time and of this process's CPU time, which stays meaningful when other
    processes compete for the cores), ``train_loss`` (mean over this run), ``final_loss`` (the last logged loss),
    peak memory, sizes. ``callbacks`` are added to the Trainer's. ``device="cpu"`` keeps training on the CPU where
    a GPU is present; otherwise the Trainer picks its device (the GPU where there is one).
    """
    _check_training_args(
        epochs, learning_rate, batch_size, gradient_accumulation_steps, max_steps, save_steps, logging_steps
    )
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    if trainable == 0:
        raise ValueError(
            "The model has no trainable parameters. Pass a PEFT model made with get_peft_model, or an adapter loaded "
            "with PeftModel.from_pretrained(..., is_trainable=True)."
        )
    if len(train_dataset) == 0:
        raise ValueError("The training dataset is empty.")
    output_dir = Path(output_dir)
    use_cpu = torch.device(device).type == "cpu" if device is not None else not torch.cuda.is_available()
    arguments = TrainingArguments(
        output_dir=str(checkpoint_dir if checkpoint_dir is not None else output_dir),
        num_train_epochs=epochs,
        max_steps=max_steps,
        learning_rate=learning_rate,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        lr_scheduler_type=lr_scheduler_type,
        warmup_steps=warmup,
        weight_decay=0.0,
        seed=seed,
        data_seed=seed,
        train_sampling_strategy="random" if shuffle else "sequential",
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=save_total_limit,
        logging_strategy="steps",
        logging_steps=logging_steps,
        report_to=[],
        use_cpu=use_cpu,
        dataloader_num_workers=0,
        dataloader_pin_memory=not use_cpu,
        # Our collator builds exactly the columns the model takes.
        remove_unused_columns=False,
        disable_tqdm=disable_tqdm,
    )
    timer = _StepTimer()
    trainer = RecoveryTrainer(
        model=model,
        args=arguments,
        train_dataset=train_dataset,
        data_collator=PaddingCollator(pad_token_id_of(tokenizer)),
        callbacks=[timer, _CheckpointMarker(), *callbacks],
        teacher=teacher,
        distill_alpha=distill_alpha,
        temperature=temperature,
    )
    warn_if_fsdp_was_not_applied(trainer)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with _disk_full_as_one_line(Path(arguments.output_dir)):
        result = trainer.train(
            resume_from_checkpoint=str(resume_from_checkpoint)
            if isinstance(resume_from_checkpoint, (str, os.PathLike))
            else resume_from_checkpoint
        )
    seconds = time.perf_counter() - started
    if trainer.is_world_process_zero():
        save_adapter(model, output_dir)
    trainer.accelerator.wait_for_everyone()

    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    steps_this_run = trainer.state.global_step - (timer.first_step or 0)
    metrics: dict[str, Any] = {
        "seconds": round(seconds, 3),
        "steps": trainer.state.global_step,
        "steps_this_run": steps_this_run,
        "seconds_per_step": round(statistics.median(timer.wall), 4) if timer.wall else None,
        "cpu_seconds_per_step": round(statistics.median(timer.cpu), 4) if timer.cpu else None,
        "train_loss": result.training_loss,
        "final_loss": logged[-1]["loss"] if logged else result.training_loss,
        "epochs": trainer.state.epoch,
        "train_sequences": len(train_dataset),
        "global_batch_size": batch_size * gradient_accumulation_steps * trainer.args.world_size,
        "world_size": trainer.args.world_size,
        "distributed_type": str(trainer.accelerator.distributed_type.value),
        "trainable_parameters": trainable,
        "learning_rate": learning_rate,
        "distillation": None
        if teacher is None
        else {"alpha": distill_alpha, "temperature": temperature, **_last_distill_log(logged)},
        **peak_memory_mb(),
    }
    return metrics


def warn_if_fsdp_was_not_applied(trainer: Trainer) -> bool:
    """Warn (and return True) when FSDP was asked for but accelerate trains without it.

    accelerate (1.16) applies FSDP on GPU-like devices only: ``accelerate launch --use_fsdp`` on CPU processes runs
    plain data parallelism (DDP over gloo) without a word. The adapter trained is the same; the memory saving is not.
    """
    requested = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or bool(trainer.args.fsdp)
    if not requested or trainer.is_fsdp_enabled:
        return False
    warnings.warn(
        f"FSDP was requested, but accelerate runs this job as {trainer.accelerator.distributed_type.value}: it "
        "applies FSDP on GPUs only, not on CPU processes. Every process holds the whole model; the trained adapter "
        "is the same as with FSDP. To shard on CPU, wrap the model with torch.distributed.fsdp.fully_shard in your "
        "own loop.",
        RuntimeWarning,
        stacklevel=2,
    )
    return True


def _last_distill_log(logged: list[dict[str, Any]]) -> dict[str, float]:
    last = logged[-1] if logged else {}
    return {key: last[key] for key in ("distill_kl", "lm_loss") if key in last}


def is_main_process() -> bool:
    """True in a single process, and on rank 0 of a distributed launch (torchrun / accelerate set ``RANK``)."""
    return int(os.environ.get("RANK", "0")) == 0
