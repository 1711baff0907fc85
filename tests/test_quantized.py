"""RestoreLCC on bitsandbytes-quantized bases (8-bit LLM.int8, 4-bit NF4/FP4 with and without double quantization):
training through the quantized o_proj, merging into its bias with the quantized weights untouched, stock reload.

bitsandbytes' CPU backend quirks shape these tests (field notes, section 11): a 4-bit weight is repacked on its
first eval forward without grad (after which the kernel has no backward to its input), so quantized tensors are
compared after a warm-up forward, on ``weight.data`` and ``quant_state.absmax``, never on ``state_dict()``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from peft import get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from tiny_models import make_tiny_model, random_input_ids  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

import peft_restorelcc  # noqa: E402

# head_dim 16, hidden 64: bitsandbytes' 4-bit blocks are 64 wide, so the tiny model's 32 is too narrow to repack.
TINY = dict(hidden_size=64, intermediate_size=128)
HEADS = {0: [0, 2], 1: [1]}
# Merged vs unmerged logits, relative to the largest logit. Measured: 0 for every format below (the merged bias is
# the very vector the unmerged forward adds, computed by the layer's own kernel); the bound is the 1e-4.
MERGE_RTOL = 1e-4

FORMATS = {
    "int8": dict(load_in_8bit=True),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "nf4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
        warnings.filterwarnings("ignore", message=".*autograd kernel was not registered.*")
        yield


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama", **TINY).save_pretrained(path)
    return path


def load_quantized(path, fmt: str):
    extra = {} if fmt == "int8" else {"bnb_4bit_compute_dtype": torch.float32}
    config = BitsAndBytesConfig(**FORMATS[fmt], **extra)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu", dtype=torch.float32)


def restorelcc(model, seed: int = 0):
    torch.manual_seed(seed)
    config = peft_restorelcc.RestoreLCCConfig(heads=HEADS, init_weights="gaussian", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def train(model, ids, steps: int = 6, lr: float = 3e-2) -> list[float]:
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in parameters), "no gradient reached m, b"
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def quantized_state(model) -> dict[str, torch.Tensor]:
    """Every quantized tensor: the packed/int8 weight and its quantization state (absmax, SCB)."""
    state = {}
    for name, module in model.named_modules():
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            state[f"{name}.weight"] = module.weight.data.clone()
            quant_state = getattr(module.weight, "quant_state", None)
            if quant_state is not None:
                state[f"{name}.absmax"] = quant_state.absmax.clone()
            if getattr(module.weight, "SCB", None) is not None:
                state[f"{name}.SCB"] = module.weight.SCB.clone()
    return state


def biases(model) -> dict[str, torch.Tensor]:
    return {
        name.removeprefix("base_model.model.").replace(".base_layer", ""): p.detach().clone()
        for name, p in model.named_parameters()
        if name.endswith("bias")
    }


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_wraps_quantized_layer_and_trains(tiny_dir, fmt):
    model = restorelcc(load_quantized(tiny_dir, fmt))
    layer = model.base_model.model.model.layers[0].self_attn.o_proj
    assert type(layer.base_layer).__module__.startswith("bitsandbytes")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    losses = train(model, random_input_ids(2, 16))
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("fmt", ["nf4", "fp4-double"])
def test_trains_after_an_eval_forward_repacked_the_4bit_weight(tiny_dir, fmt):
    """An eval forward without grad repacks bitsandbytes' CPU 4-bit weight; its kernel then passes no gradient to
    its input. The shift's gradient must still arrive (read out through the layer, see heads._ThroughLayer)."""
    base = load_quantized(tiny_dir, fmt)
    with torch.no_grad():
        base(random_input_ids(2, 16))
    if not getattr(base.model.layers[0].self_attn.o_proj.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes repacks 4-bit weights on CPUs with AVX512-BF16 only: the case does not arise here")
    model = restorelcc(base)
    with pytest.warns(RuntimeWarning, match="Reload the model and train before any eval forward"):
        losses = train(model, random_input_ids(2, 16))
    assert losses[-1] < losses[0] - 0.05, losses


def test_shift_gradient_matches_dense_reference(tiny_dir):
    """The gradient through the quantized layer (unpacked and repacked) equals the one through its dequantized
    weight: d(sum(c * W s))/ds = W^T c."""
    from peft.utils.integrations import dequantize_bnb_weight

    from peft_restorelcc.tuner.heads import times_weight

    layer = load_quantized(tiny_dir, "nf4").model.layers[0].self_attn.o_proj
    dense = dequantize_bnb_weight(layer.weight, state=None).float()  # before the repack, where it is exact
    cotangent = torch.randn(64, generator=torch.Generator().manual_seed(0))
    for _ in ("unpacked", "repacked"):
        shift = torch.randn(64, generator=torch.Generator().manual_seed(1), requires_grad=True)
        (times_weight(layer, shift) * cotangent).sum().backward()
        torch.testing.assert_close(shift.grad, dense.T @ cotangent, rtol=2e-2, atol=2e-2)
        layer.eval()
        with torch.no_grad():
            layer(torch.zeros(1, 64))  # triggers the CPU repack (bf16 absmax, hence the loose tolerance)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_merge_touches_only_biases_and_keeps_outputs(tiny_dir, fmt, tmp_path):
    ids = random_input_ids(2, 16)
    model = restorelcc(load_quantized(tiny_dir, fmt))
    train(model, ids, steps=2)
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits  # also the warm-up forward (4-bit CPU repack)
    before = quantized_state(model)
    biases_before = biases(model)
    merged = model.merge_and_unload()
    after = quantized_state(merged)
    assert before.keys() == after.keys() and before
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), f"{name} changed"
    merged_biases = biases(merged)
    for name, bias in merged_biases.items():
        if name.endswith("o_proj.bias"):
            assert bias.abs().max() > 0
        else:  # q/k/v get zero biases so that attention_bias=True reloads; nothing else changes
            assert name.split(".")[-2] in {"q_proj", "k_proj", "v_proj"} and not bias.any()
    assert not biases_before  # the tiny Llama has no attention bias: merge created every one
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
    error = ((merged_logits - unmerged).abs().max() / unmerged.abs().max()).item()
    assert error <= MERGE_RTOL, error

    # Stock transformers saves the merged quantized model and reloads it (quantization_config from config.json).
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu", dtype=torch.float32)
    assert reloaded.config.attention_bias
    for index, layer in enumerate(reloaded.model.layers):
        original = merged.model.layers[index].self_attn.o_proj.bias
        torch.testing.assert_close(layer.self_attn.o_proj.bias.float(), original.float(), rtol=0, atol=0)
    # bitsandbytes' CPU save un-repacks a 4-bit weight in place, and the next forward repacks it: a model's own
    # outputs move by ~0.002-0.02 (of logits ~0.5) across save_pretrained, with or without an adapter (measured on
    # the plain quantized model too). So the reload is compared with the merged model as it is after saving.
    with torch.no_grad():
        reloaded_logits = reloaded(input_ids=ids).logits
        saved_logits = merged(input_ids=ids).logits
    torch.testing.assert_close(reloaded_logits, saved_logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_saved_merged_model_holds_the_checkpoints_own_quantized_weights(tiny_dir, fmt, tmp_path):
    """Train, merge, save, reload: every quantized tensor equals that of the base checkpoint quantized afresh.
    (The merge reads W @ shift through the layer without triggering bitsandbytes' lossy CPU repack.)"""
    fresh = quantized_state(load_quantized(tiny_dir, fmt))
    model = restorelcc(load_quantized(tiny_dir, fmt))
    train(model, random_input_ids(2, 16), steps=2)
    model.merge_and_unload().save_pretrained(tmp_path)
    reloaded = quantized_state(AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu", dtype=torch.float32))
    assert fresh.keys() == reloaded.keys()
    for name, tensor in fresh.items():
        assert torch.equal(tensor, reloaded[name]), f"{name} differs from the checkpoint quantized afresh"


def test_unmerge_restores_no_bias(tiny_dir):
    model = restorelcc(load_quantized(tiny_dir, "nf4"))
    train(model, random_input_ids(2, 16), steps=1)
    model.merge_adapter()
    layer = model.base_model.model.model.layers[0].self_attn.o_proj
    assert layer.base_layer.bias is not None
    model.unmerge_adapter()
    assert layer.base_layer.bias is None


def test_kbit_training_with_gradient_checkpointing_and_trainer(tiny_dir, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    base = prepare_model_for_kbit_training(load_quantized(tiny_dir, "nf4"), use_gradient_checkpointing=True)
    model = restorelcc(base)
    ids = random_input_ids(4, 16)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=8,
        learning_rate=3e-2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        gradient_checkpointing=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0] - 0.05, losses


class FakeQuantLinear(nn.Linear):
    """A Linear subclass whose weight is integer storage, from no library RestoreLCC knows."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=False)
        self.weight = nn.Parameter(torch.zeros_like(linear.weight, dtype=torch.int8), requires_grad=False)


def test_unsupported_layer_type_refused_in_one_line():
    model = make_tiny_model("llama", **TINY)
    attention = model.model.layers[1].self_attn
    attention.o_proj = FakeQuantLinear(attention.o_proj)
    with pytest.raises(ValueError) as raised:
        get_peft_model(model, peft_restorelcc.RestoreLCCConfig(heads=HEADS, task_type="CAUSAL_LM"))
    message = str(raised.value)
    assert "\n" not in message and "FakeQuantLinear" in message and "model.layers.1.self_attn.o_proj" in message
    assert not any("restorelcc" in type(module).__module__ for module in model.modules())


def test_cli_train_on_a_4bit_base(tiny_dir, tmp_path, capsys):
    """`restorelcc train --quantization nf4`: the pruned model loaded 4-bit, the adapter trained on it."""
    import json

    from safetensors.torch import load_file
    from test_training import char_tokenizer

    from peft_restorelcc import cli

    char_tokenizer().save_pretrained(tiny_dir)
    adapter = tmp_path / "adapter"
    restorelcc(AutoModelForCausalLM.from_pretrained(tiny_dir)).save_pretrained(adapter)
    data = tmp_path / "data.jsonl"
    rows = [json.dumps({"prompt": f"Q{i}: what follows {i}?\nA:", "response": f" {i + 1}"}) for i in range(8)]
    data.write_text("\n".join(rows) + "\n")
    output = tmp_path / "trained"
    argv = ["train", "--model", str(tiny_dir), "--adapter", str(adapter), "--output", str(output), "--data", str(data),
            "--seq-len", "32", "--batch-size", "4", "--lr", "1e-2", "--max-steps", "3", "--threads", "1",
            "--device", "cpu", "--quantization", "nf4"]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    metrics = json.loads((output / "train_metrics.json").read_text())
    assert metrics["quantization"] == "nf4" and metrics["steps"] == 3
    before = load_file(str(adapter / "adapter_model.safetensors"))
    after = load_file(str(output / "adapter_model.safetensors"))
    for key in before:
        assert torch.equal(before[key], after[key]) == key.endswith("restorelcc_basis"), key
        assert after[key].dtype == torch.float32


def test_cli_refuses_an_unknown_quantization(capsys):
    from peft_restorelcc import cli

    with pytest.raises(SystemExit) as exited:
        cli.main(["train", "--model", "m", "--adapter", "a", "--output", "o", "--quantization", "int3"])
    assert exited.value.code == 2 and "int3" in capsys.readouterr().err


def test_cli_merge_into_a_4bit_base(tiny_dir, tmp_path, capsys):
    """`restorelcc merge --quantization nf4`: biases written, quantized tensors checked bit for bit and reported."""
    import json

    from test_training import char_tokenizer

    from peft_restorelcc import cli

    char_tokenizer().save_pretrained(tiny_dir)
    adapter = tmp_path / "adapter"
    model = restorelcc(load_quantized(tiny_dir, "nf4"))
    train(model, random_input_ids(2, 16), steps=2)
    model.save_pretrained(adapter)
    output = tmp_path / "merged"
    argv = ["merge", "--model", str(tiny_dir), "--adapter", str(adapter), "--output", str(output)]
    assert cli.main([*argv, "--quantization", "nf4"]) == 0, capsys.readouterr().err
    assert "bit-identical" in capsys.readouterr().out
    report = json.loads((output / "merge_report.json").read_text())
    assert report["quantized_weights_unchanged"] and report["quantized_tensors"] == 28
    reloaded = AutoModelForCausalLM.from_pretrained(output, device_map="cpu", dtype=torch.float32)
    assert isinstance(reloaded.model.layers[0].self_attn.o_proj, bnb.nn.Linear4bit)
    assert reloaded.model.layers[0].self_attn.o_proj.bias.abs().max() > 0


def test_a_linear_without_a_weight_is_refused_in_one_line():
    """compressed-tensors' CompressedLinear keeps ``weight_packed`` etc. and may have no ``weight`` at all."""

    class PackedLinear(nn.Linear):
        def __init__(self, linear: nn.Linear):
            super().__init__(linear.in_features, linear.out_features, bias=False)
            del self.weight
            self.register_buffer("weight_packed", torch.zeros(linear.out_features, linear.in_features // 8))

    model = make_tiny_model("llama", **TINY)
    model.model.layers[0].self_attn.o_proj = PackedLinear(model.model.layers[0].self_attn.o_proj)
    with pytest.raises(ValueError, match=r"PackedLinear \(no weight\)") as raised:
        get_peft_model(model, peft_restorelcc.RestoreLCCConfig(heads=HEADS, task_type="CAUSAL_LM"))
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_the_layer_path_against_the_dequantized_weight(tiny_dir, fmt):
    """W @ shift through the layer equals the dequantized weight's product for the weight-only 4-bit formats; LLM.int8
    also quantizes the shift as an activation (row-wise int8): measured 0.7% relative here, bounded at 2%. It is what
    the unmerged model adds, so merged and unmerged outputs agree either way."""
    from peft.utils.integrations import dequantize_bnb_weight

    from peft_restorelcc.tuner.heads import times_weight

    layer = load_quantized(tiny_dir, fmt).model.layers[0].self_attn.o_proj
    dense = dequantize_bnb_weight(layer.weight, state=getattr(layer, "state", None)).float()
    shift = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 1e-2
    with torch.no_grad():
        through_layer = times_weight(layer, shift)
    expected = dense @ shift
    error = ((through_layer - expected).abs().max() / expected.abs().max()).item()
    assert error <= (2e-2 if fmt == "int8" else 1e-6), error
    # Reading it did not repack the 4-bit weight (bitsandbytes' CPU repack rounds absmax to bf16).
    assert not getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False)


def test_cli_run_on_a_4bit_base(tmp_path, capsys):
    """`restorelcc run --quantization nf4`: pruned, then reloaded 4-bit, evaluated, trained on and merged into."""
    import json

    from test_training import char_tokenizer

    from peft_restorelcc import cli

    model_dir = tmp_path / "tiny"
    make_tiny_model("llama", max_position_embeddings=512, initializer_range=0.3, **TINY).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    output = tmp_path / "run"
    argv = ["run", "--model", str(model_dir), "--output", str(output), "--tasks", "arc_easy", "--limit", "2",
            "--train-steps", "2", "--train-samples", "8", "--calibration-samples", "6", "--num-pairs", "8",
            "--prune-samples", "4", "--perplexity-passages", "2", "--batch-size", "2", "--device", "cpu",
            "--quantization", "nf4"]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    results = json.loads((output / "results.json").read_text())
    assert results["settings"]["quantization"] == "nf4"
    assert {"dense", "pruned", "pruned_quantized", "restored"} <= set(results["results"])
    assert results["quantized_tensors"] == 28 and results["quantized_tensors_changed_by_merge"] == []
    assert results["sparsity_after_merge"] == results["sparsity_before_merge"] > 0.4
    merged = AutoModelForCausalLM.from_pretrained(results["paths"]["merged"], device_map="cpu", dtype=torch.float32)
    assert isinstance(merged.model.layers[0].self_attn.o_proj, bnb.nn.Linear4bit)
