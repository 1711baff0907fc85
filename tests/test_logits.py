"""The language-model head at the labelled positions only: the same rows, the same loss, the same gradients."""

from __future__ import annotations

import pytest
import torch
from test_training import restorelcc_model, tiny_records
from tiny_models import make_tiny_model, random_input_ids
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, TrainingArguments

from peft_restorelcc.training.logits import (
    cross_entropy_sum,
    head_inputs_at,
    head_logits,
    lm_head_at,
    next_token_targets,
)
from peft_restorelcc.training.trainer import PaddingCollator, RecoveryTrainer, distillation_kl

# fp32 sums over a few dozen tokens in another order: the loss and gradients agree to float rounding.
TOLERANCE = dict(rtol=1e-6, atol=1e-6)


def tiny_gemma3() -> Gemma3ForCausalLM:
    """Gemma 3 applies soft-capping after its head: the narrowed rows must carry it as the full forward does."""
    config = Gemma3TextConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, final_logit_softcapping=2.0, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config).eval()


@pytest.mark.parametrize("build", [lambda: make_tiny_model("llama"), lambda: make_tiny_model("gpt2"), tiny_gemma3])
def test_narrowed_head_gives_the_full_forwards_rows(build) -> None:
    model = build()
    input_ids = random_input_ids(3, 10)
    positions = torch.rand(3, 10, generator=torch.Generator().manual_seed(0)) > 0.5
    with torch.no_grad():
        full = model(input_ids=input_ids).logits
        with lm_head_at(model, positions):
            narrowed = model(input_ids=input_ids).logits
        with lm_head_at(model, None):
            none = model(input_ids=input_ids).logits
    assert narrowed.shape == (1, int(positions.sum()), full.shape[-1])
    torch.testing.assert_close(narrowed[0], full[positions], **TOLERANCE)
    assert none.shape == (3, 0, full.shape[-1])
    # The hook is gone afterwards.
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, full)


def test_next_token_targets_are_the_labels_shifted_by_one() -> None:
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, 8, 9, 3]])
    positions, targets = next_token_targets(labels)
    assert positions.tolist() == [[False, True, True, False, False], [True, True, True, True, False]]
    assert targets.tolist() == [5, 6, 7, 8, 9, 3]


def test_chunked_cross_entropy_equals_one_call() -> None:
    rows = torch.randn(50, 97, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 97, (50,), generator=torch.Generator().manual_seed(1))
    expected = torch.nn.functional.cross_entropy(rows, targets, reduction="sum")
    torch.testing.assert_close(cross_entropy_sum(rows, targets, chunk_rows=7), expected, **TOLERANCE)


def trainer_for(model, tmp_path, teacher=None, distill_alpha: float = 1.0, **chunking) -> RecoveryTrainer:
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    return RecoveryTrainer(model=model, args=args, teacher=teacher, distill_alpha=distill_alpha, **chunking)


def gradients(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def random_adapter():
    # A non-zero adapter, so that its gradients depend on the logits it is trained through.
    return restorelcc_model(init_std=0.1).train()


@pytest.mark.parametrize("num_items_in_batch", [None, 40])
def test_label_position_loss_and_gradients_equal_the_models_own(tmp_path, num_items_in_batch) -> None:
    model = random_adapter()
    batch = PaddingCollator(pad_token_id=0)(tiny_records(4))
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    full = model(**batch).loss
    if num_items_in_batch is not None:  # the model's mean, as the Trainer's sum over the global batch's tokens
        full = full * labelled / num_items_in_batch
    full.backward()
    expected = gradients(model)
    loss = trainer_for(model, tmp_path).compute_loss(model, dict(batch), num_items_in_batch=num_items_in_batch)
    loss.backward()
    torch.testing.assert_close(loss, full, **TOLERANCE)
    for name, grad in gradients(model).items():
        torch.testing.assert_close(grad, expected[name], **TOLERANCE, msg=name)


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_label_position_distillation_equals_the_full_logits_kl(tmp_path, alpha) -> None:
    model = random_adapter()
    teacher = make_tiny_model("llama")
    batch = PaddingCollator(pad_token_id=0)(tiny_records(4))
    labels = batch["labels"]
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    kl = distillation_kl(model(**inputs).logits, teacher(**inputs).logits, labels)
    full = alpha * kl + (1 - alpha) * model(**batch).loss
    full.backward()
    expected = gradients(model)
    loss = trainer_for(model, tmp_path, teacher=teacher, distill_alpha=alpha).compute_loss(model, dict(batch))
    loss.backward()
    torch.testing.assert_close(loss, full, **TOLERANCE)
    for name, grad in gradients(model).items():
        torch.testing.assert_close(grad, expected[name], **TOLERANCE, msg=name)


def test_prediction_step_still_sees_the_full_logits(tmp_path) -> None:
    model = random_adapter().eval()
    batch = PaddingCollator(pad_token_id=0)(tiny_records(4))
    with torch.no_grad():
        loss, outputs = trainer_for(model, tmp_path).compute_loss(model, dict(batch), return_outputs=True)
        expected = model(**batch)
    assert outputs.logits.shape == expected.logits.shape
    torch.testing.assert_close(loss, expected.loss, **TOLERANCE)


def test_the_auto_batch_shrinks_with_the_vocabulary_and_stays_in_range() -> None:
    from peft_restorelcc.training.logits import MAX_AUTO_BATCH, SCORING_BYTES_PER_LOGIT, rows_within_budget

    free, model_bytes = 16 * 2**30, 4 * 2**30  # a budget of half the model: 2 GiB
    smollm = rows_within_budget(200, 49_152, "cpu", model_bytes=model_bytes, free_bytes=free)
    gemma = rows_within_budget(200, 262_144, "cpu", model_bytes=model_bytes, free_bytes=free)
    assert gemma < smollm <= MAX_AUTO_BATCH
    # A batch's logits (and their copies) take at most half the model's size ...
    assert gemma * 200 * 262_144 * SCORING_BYTES_PER_LOGIT <= model_bytes / 2
    assert smollm * 200 * 49_152 * SCORING_BYTES_PER_LOGIT <= model_bytes / 2
    # ... and at most 40% of the free memory.
    low = rows_within_budget(200, 49_152, "cpu", model_bytes=model_bytes, free_bytes=2 * 2**30)
    assert low * 200 * 49_152 * SCORING_BYTES_PER_LOGIT <= 0.4 * 2 * 2**30 < smollm * 200 * 49_152 * SCORING_BYTES_PER_LOGIT
    assert rows_within_budget(10**6, 262_144, "cpu", free_bytes=free) == 1
    assert rows_within_budget(1, 10, "cpu", free_bytes=free) == MAX_AUTO_BATCH


@pytest.mark.parametrize("text,expected", [("auto", "auto"), ("12", 12), (3, 3)])
def test_batch_size_flag_values(text, expected) -> None:
    from peft_restorelcc.training.choices import parse_batch_size

    assert parse_batch_size(text, "--batch-size") == expected


@pytest.mark.parametrize("text", ["0", "-2", "many", "1.5"])
def test_bad_batch_size_flags_name_the_flag_and_the_choices(text) -> None:
    from peft_restorelcc.training.choices import parse_batch_size

    with pytest.raises(ValueError, match=r"--batch-size must be 'auto' or a positive integer"):
        parse_batch_size(text, "--batch-size")


# ---- plain text: every token labelled, the head run a chunk of rows at a time ----------------------------------

# Every step chunked (threshold 0), 7 rows of a 97-token vocabulary per chunk: several chunks and a ragged last one.
CHUNKED = dict(head_chunk_threshold=0, head_chunk_bytes=7 * 97 * 4)


def text_batch(batch: int = 3, length: int = 12) -> dict[str, torch.Tensor]:
    """Plain text as `--data text` trains on it: every token is a label."""
    input_ids = random_input_ids(batch, length)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def gemma3_adapter():
    from peft import get_peft_model

    from peft_restorelcc import RestoreLCCConfig

    config = RestoreLCCConfig(init_weights="gaussian", heads={0: [1, 2], 1: [0, 3]}, init_std=0.1, task_type="CAUSAL_LM")
    return get_peft_model(tiny_gemma3(), config).train()


@pytest.mark.parametrize("build", [random_adapter, gemma3_adapter], ids=["llama", "gemma3-softcapped"])
def test_chunked_text_loss_and_gradients_equal_the_models_own(tmp_path, build) -> None:
    model = build()
    batch = text_batch()
    full = model(**batch).loss
    full.backward()
    expected = gradients(model)
    trainer = trainer_for(model, tmp_path, **CHUNKED)
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    assert trainer.head_chunk_threshold == 0  # the chunked path ran: the model's head was reproduced
    torch.testing.assert_close(loss, full, **TOLERANCE)
    for name, grad in gradients(model).items():
        torch.testing.assert_close(grad, expected[name], **TOLERANCE, msg=name)


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_chunked_distillation_equals_the_full_logits_kl(tmp_path, alpha) -> None:
    model = random_adapter()
    teacher = make_tiny_model("llama")
    batch = text_batch()
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    kl = distillation_kl(model(**inputs).logits, teacher(**inputs).logits, batch["labels"])
    full = alpha * kl + (1 - alpha) * model(**batch).loss
    full.backward()
    expected = gradients(model)
    loss = trainer_for(model, tmp_path, teacher=teacher, distill_alpha=alpha, **CHUNKED).compute_loss(model, batch)
    loss.backward()
    torch.testing.assert_close(loss, full, **TOLERANCE)
    for name, grad in gradients(model).items():
        torch.testing.assert_close(grad, expected[name], **TOLERANCE, msg=name)


def test_a_head_the_chunks_do_not_reproduce_falls_back_to_one_call(tmp_path, monkeypatch) -> None:
    """A model that changes its logits after the head in a way head_logits does not know: the check against the
    model's own rows fails, a warning says so, and the loss is the model's own."""
    import peft_restorelcc.training.trainer as training

    model = random_adapter()
    batch = text_batch()
    full = model(**batch).loss
    monkeypatch.setattr(training, "head_logits", lambda m: (lambda hidden: 2.0 * head_logits(m)(hidden)))
    trainer = trainer_for(model, tmp_path, **CHUNKED)
    with pytest.warns(RuntimeWarning, match="does not reproduce"):
        loss = trainer.compute_loss(model, dict(batch))
    assert trainer.head_chunk_threshold is None
    torch.testing.assert_close(loss, full, **TOLERANCE)


def test_small_steps_keep_the_one_call_head(tmp_path, monkeypatch) -> None:
    """Under the default threshold (256 MiB of logits) a step never goes through the chunks."""
    import peft_restorelcc.training.trainer as training

    def refuse(*args, **kwargs):
        raise AssertionError("chunked")

    monkeypatch.setattr(training, "chunked_head_loss", refuse)
    model = random_adapter()
    torch.testing.assert_close(trainer_for(model, tmp_path).compute_loss(model, text_batch()), model(**text_batch()).loss)


@pytest.mark.parametrize("build", [lambda: make_tiny_model("llama"), tiny_gemma3])
def test_captured_head_inputs_give_the_full_forwards_rows(build) -> None:
    model = build()
    input_ids = random_input_ids(3, 10)
    positions = torch.rand(3, 10, generator=torch.Generator().manual_seed(0)) > 0.5
    with torch.no_grad():
        full = model(input_ids=input_ids).logits
        with head_inputs_at(model, positions, check_rows=2) as captured:
            own = model(input_ids=input_ids).logits
        computed = head_logits(model)(captured.hidden)
    assert own.shape == (1, 2, full.shape[-1])
    torch.testing.assert_close(computed, full[positions], **TOLERANCE)
    torch.testing.assert_close(own[0], full[positions][:2], **TOLERANCE)
