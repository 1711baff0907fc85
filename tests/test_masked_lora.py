"""Masked LoRA (peft_restorelcc.masked_lora): PEFT's LoRA whose update keeps a pruned model's zeros, on tiny real
transformers models: the mask in forward, the merge bit for bit, training, and save/load through PEFT's own calls."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from tiny_models import make_tiny_model, random_input_ids

from peft_restorelcc.compare.masked_lora import MASK_BUFFER, MaskedLinear, MaskedLoraConfig, MaskedLoraModel


def _pruned(model_type: str = "llama") -> torch.nn.Module:
    """A tiny model with half of every decoder linear weight zeroed at random (embeddings and head kept)."""
    model = make_tiny_model(model_type)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if weight is not None and weight.dim() == 2 and (".layers." in name or ".h." in name):
                weight[torch.rand(weight.shape, generator=generator) < 0.5] = 0
    return model


def _masked(model: torch.nn.Module, **overrides) -> torch.nn.Module:
    # init_lora_weights=False: B is random too, so the update is not zero before training
    config = MaskedLoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, **overrides)
    return get_peft_model(model, config)


def _pruned_and_masked() -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """The pruned tiny Llama, a masked LoRA on a copy of it, and a batch of token ids."""
    torch.manual_seed(0)
    pruned = _pruned()
    return pruned, _masked(copy.deepcopy(pruned)), random_input_ids()


def _zero_masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: parameter == 0 for name, parameter in model.named_parameters() if parameter.dim() == 2}


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])  # nn.Linear, and transformers' Conv1D (fan_in_fan_out)
def test_the_forward_adds_the_lora_update_masked_by_the_base_weights_zeros(model_type):
    torch.manual_seed(0)
    model = _masked(_pruned(model_type))
    layers = [module for module in model.modules() if isinstance(module, MaskedLinear)]
    assert layers and isinstance(model.base_model, MaskedLoraModel)
    for layer in layers:
        x = torch.randn(3, layer.in_features)
        base = layer.get_base_layer()
        weight = base.weight if not layer.fan_in_fan_out else base.weight.T  # (out, in)
        update = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
        expected = base(x) + x @ (update * (weight != 0)).T
        unmasked = base(x) + x @ update.T
        actual = layer(x)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(actual, unmasked, atol=1e-4)  # the mask does something
        assert torch.equal(getattr(layer, MASK_BUFFER), weight.T != 0 if layer.fan_in_fan_out else weight != 0)


def test_the_merge_keeps_every_pruned_zero_bit_for_bit_and_the_logits():
    pruned, model, ids = _pruned_and_masked()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        merged = model.merge_and_unload()
        assert type(merged) is type(pruned)
        torch.testing.assert_close(merged(input_ids=ids).logits, unmerged, rtol=1e-5, atol=1e-5)
    before, after = _zero_masks(pruned), _zero_masks(merged)
    assert before.keys() == after.keys()
    for name in before:  # exactly the pruned zeros: none filled, none added
        assert torch.equal(before[name], after[name]), name
    changed = sum(int((p != q).sum()) for p, q in zip(pruned.parameters(), merged.parameters()))
    assert changed > 0  # the update was merged where the weights are not zero


def test_training_updates_only_unpruned_weights_and_merge_unmerge_round_trips():
    pruned, model, ids = _pruned_and_masked()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    layer = next(module for module in model.modules() if isinstance(module, MaskedLinear))
    weight = layer.get_base_layer().weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.get_base_layer().weight == 0, weight == 0)
    layer.unmerge()
    torch.testing.assert_close(layer.get_base_layer().weight, weight, rtol=0, atol=1e-6)
    assert torch.equal(layer.get_base_layer().weight == 0, weight == 0)  # the zeros never moved


def test_save_and_load_through_peft_stays_masked_and_merges_with_the_zeros_kept(tmp_path):
    pruned, model, ids = _pruned_and_masked()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = (tmp_path / "adapter" / "adapter_config.json").read_text()
    assert '"peft_type": "MASKED_LORA"' in saved
    assert not any(MASK_BUFFER in key for key in get_peft_model_state_dict(model))  # recomputed, not saved

    reloaded = PeftModel.from_pretrained(copy.deepcopy(pruned), tmp_path / "adapter")
    assert isinstance(reloaded.peft_config["default"], MaskedLoraConfig)
    assert isinstance(reloaded.base_model, MaskedLoraModel)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=0)
        # The same weights as a plain LoRA give other logits: the reload is masked, not LoRA.
        plain = get_peft_model(copy.deepcopy(pruned), LoraConfig(r=4, target_modules="all-linear"))
        plain.load_state_dict(reloaded.state_dict(), strict=False)
        assert not torch.allclose(plain(input_ids=ids).logits, expected, atol=1e-4)
        merged = reloaded.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    before, after = _zero_masks(pruned), _zero_masks(merged)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_a_second_masked_adapter_and_the_refused_configurations():
    torch.manual_seed(0)
    model = _masked(_pruned())
    model.add_adapter("other", MaskedLoraConfig(r=2, target_modules="all-linear"))
    layer = next(module for module in model.modules() if isinstance(module, MaskedLinear))
    assert set(layer.lora_variant) == {"default", "other"}
    with pytest.raises(ValueError, match="use_dora"):
        MaskedLoraConfig(r=2, use_dora=True)
    with pytest.raises(ValueError, match="linear layers only"):
        get_peft_model(_pruned(), MaskedLoraConfig(r=2, target_modules=["embed_tokens"]))


def test_a_fresh_interpreter_reloads_the_adapter_masked_through_peft_alone(tmp_path):
    """No ``import peft_restorelcc`` in the loading process: the installed import hook registers MASKED_LORA, and
    ``PeftModel.from_pretrained`` rebuilds the masked layers, with the same logits."""
    import json
    import os
    import subprocess
    import sys

    pruned, model, ids = _pruned_and_masked()
    pruned.save_pretrained(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    code = (
        "import json, torch\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
        "model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('base'), 'adapter')\n"
        "torch.save(model(input_ids=torch.load('ids.pt')).logits.detach(), 'logits.pt')\n"
        "print(json.dumps({'tuner': type(model.base_model).__name__, 'type': model.peft_config['default'].peft_type}))\n"
    )
    import peft_restorelcc_autoload

    env = {name: value for name, value in os.environ.items() if name != peft_restorelcc_autoload.ENV_VAR}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"tuner": "MaskedLoraModel", "type": "MASKED_LORA"}
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=1e-6)
