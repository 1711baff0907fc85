"""RestoreLCC with the rest of the ecosystem: Trainer, AutoPeftModel, the Hub push (network patched)."""

from unittest import mock

import pytest
import torch
from peft import AutoPeftModelForCausalLM, get_peft_model
from test_model import HEADS, prune_half
from tiny_models import make_tiny_model, random_input_ids
from transformers import Trainer, TrainingArguments

from peft_restorelcc import RestoreLCCConfig, restorelcc_layers
from peft_restorelcc.io.push import push_to_hub


def train_a_few_steps(model, output_dir, gradient_checkpointing):
    input_ids = random_input_ids(batch=8, length=10, seed=3)
    dataset = [{"input_ids": row, "labels": row} for row in input_ids]
    arguments = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        gradient_checkpointing=gradient_checkpointing,
        seed=0,
    )
    Trainer(model=model, args=arguments, train_dataset=dataset).train()


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_trainer_changes_only_magnitudes_and_biases(tmp_path, gradient_checkpointing):
    base = prune_half(make_tiny_model("llama"))
    if gradient_checkpointing:
        base.enable_input_require_grads()
    model = get_peft_model(base, RestoreLCCConfig(heads=HEADS, task_type="CAUSAL_LM"))
    before = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    train_a_few_steps(model, tmp_path, gradient_checkpointing)
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert changed and changed == {name for name in before if name in trainable}
    assert all("restorelcc_magnitude" in name or "restorelcc_bias" in name for name in changed)


def test_auto_peft_model_loads_base_and_adapter(tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    prune_half(make_tiny_model("llama")).save_pretrained(base_dir)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    config = RestoreLCCConfig(init_weights="gaussian", heads=HEADS, init_std=0.1, task_type="CAUSAL_LM")
    model = get_peft_model(base, config).eval()
    model.save_pretrained(adapter_dir)
    inputs = random_input_ids()
    loaded = AutoPeftModelForCausalLM.from_pretrained(adapter_dir).eval()
    assert len(list(restorelcc_layers(loaded))) == 2
    torch.testing.assert_close(loaded(inputs).logits, model(inputs).logits, rtol=0, atol=0)


class FakeHubApi:
    """Stands in for the network only: records what would be uploaded, reading the files during the call."""

    def __init__(self):
        self.uploaded: dict[str, bytes] = {}

    def create_repo(self, repo_id, **kwargs):
        return mock.Mock(repo_id=repo_id)

    def create_commit(self, repo_id, operations, **kwargs):
        for operation in operations:
            with open(operation.path_or_fileobj, "rb") as handle:
                self.uploaded[operation.path_in_repo] = handle.read()
        return mock.Mock(oid="0" * 40)


def adapted_with_name(tmp_path):
    from transformers import AutoModelForCausalLM

    prune_half(make_tiny_model("llama")).save_pretrained(tmp_path / "pruned-llama")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned-llama")
    return get_peft_model(base, RestoreLCCConfig(heads=HEADS, task_type="CAUSAL_LM"))


def test_stock_push_to_hub_uploads_a_loadable_restorelcc_adapter(tmp_path):
    import json

    model = adapted_with_name(tmp_path)
    api = FakeHubApi()
    card = mock.Mock()
    with (
        mock.patch("transformers.utils.hub.hf_api", return_value=api),
        mock.patch("transformers.utils.hub.create_and_tag_model_card", return_value=card),
    ):
        model.push_to_hub("someone/restorelcc-test")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(api.uploaded)
    assert json.loads(api.uploaded["adapter_config.json"])["peft_type"] == "RESTORELCC"


def test_restorelcc_push_writes_a_card_that_names_the_method_and_base(tmp_path):
    import json

    from safetensors.torch import load

    model = adapted_with_name(tmp_path)
    api = FakeHubApi()
    with mock.patch("transformers.utils.hub.hf_api", return_value=api):
        push_to_hub(model, "someone/restorelcc-test")
    config = json.loads(api.uploaded["adapter_config.json"])
    assert config["peft_type"] == "RESTORELCC" and config["heads"] == {"0": [1], "1": [0, 3]}
    tensors = load(api.uploaded["adapter_model.safetensors"])
    assert any(key.endswith("restorelcc_basis") for key in tensors)
    card = api.uploaded["README.md"].decode()
    assert "RestoreLCC" in card and "restorelcc" in card
    assert str(tmp_path / "pruned-llama") in card
