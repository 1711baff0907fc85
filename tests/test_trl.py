"""TRL's SFTTrainer with a RestoreLCC ``peft_config``, as with a LoRA one: it wraps the model, trains the adapter
only, saves it, and the saved adapter reloads to the trained model's outputs. SFTConfig's defaults are kept
(gradient checkpointing and bf16 autocast on), since they are what a user gets."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import torch
import trl
from peft import PeftModel
from test_evaluation import _TOKENIZER_TEXT, make_eval_model, make_tiny_tokenizer
from tiny_models import random_input_ids

from peft_restorelcc import RestoreLCCConfig

HEADS = {0: [0, 3], 1: [1]}


def base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's own tensors under their plain names, whether or not PEFT has wrapped it."""
    return {
        name.replace(".base_layer.", "."): tensor.detach().clone()
        for name, tensor in model.state_dict().items()
        if "restorelcc_" not in name
    }


def adapter_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters() if parameter.requires_grad}


def test_sft_trainer_trains_saves_and_reloads_a_restorelcc_adapter(tmp_path: Path) -> None:
    dataset = datasets.Dataset.from_list([{"text": text} for text in _TOKENIZER_TEXT])
    args = trl.SFTConfig(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
                         learning_rate=1e-2, max_length=32, logging_steps=1, save_strategy="no", report_to=[],
                         use_cpu=True, seed=0)  # fmt: skip
    trainer = trl.SFTTrainer(
        make_eval_model(),
        args=args,
        train_dataset=dataset,
        processing_class=make_tiny_tokenizer(),
        peft_config=RestoreLCCConfig(heads=HEADS, task_type="CAUSAL_LM"),
    )
    model = trainer.model
    assert isinstance(model, PeftModel) and model.peft_config["default"].peft_type == "RESTORELCC"
    initial = adapter_weights(model)
    assert sorted({name.split(".restorelcc_")[1] for name in initial}) == ["bias.default", "magnitude.default"]
    assert len(initial) == 2 * len(HEADS)  # m and b of each targeted o_proj, nothing else trainable

    trainer.train()
    assert trainer.state.global_step == 3
    trained = adapter_weights(model)
    for name, value in trained.items():
        assert value.dtype == torch.float32, name  # bf16 autocast computes in bf16 but keeps the adapter fp32
        assert (value - initial[name]).abs().max() > 1e-4, f"{name} did not train"
    reference = base_weights(make_eval_model())
    after = base_weights(model.get_base_model())
    assert after.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.equal(after[name], value), f"base weight {name} changed"

    trainer.save_model(str(tmp_path / "adapter"))
    saved_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved_config["peft_type"] == "RESTORELCC"
    reloaded = PeftModel.from_pretrained(make_eval_model(), tmp_path / "adapter").eval()
    ids = random_input_ids(batch=2, length=10)
    # With bf16 on, accelerate wraps the trained model's forward in autocast; unwrapping removes that.
    model = trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False).eval()
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(reloaded(ids).logits, expected)
        with reloaded.disable_adapter():
            assert (reloaded(ids).logits - expected).abs().max() > 1e-4  # the reload is not the bare base model
