"""Activation capture: hooks, padding, positions, model checks, structured pruning, bounded memory."""

from __future__ import annotations

import string

import pytest
import torch
from tiny_models import make_tiny_model, random_input_ids
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from peft_restorelcc.calibration import (
    LostAccumulator,
    ModelLoader,
    calibrate,
    capture_activations,
    last_token_positions,
)


def char_tokenizer(extra: str = "") -> PreTrainedTokenizerFast:
    """A character-level tokenizer that fits the tiny models' vocabulary of 97."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for char in " " + string.ascii_letters + string.digits + ".,:;?!'\"-()\n" + extra:
        if char not in vocab and len(vocab) < 97:
            vocab[char] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def ragged_prompts(count: int = 6, seed: int = 3) -> list[list[int]]:
    ids = random_input_ids(batch=count, length=12, seed=seed)
    return [ids[i, : 5 + i % 7].tolist() for i in range(count)]


def count_forwards(*models: torch.nn.Module) -> list[int]:
    calls = [0]
    for model in models:
        model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_last_token_positions_left_and_right() -> None:
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_positions(mask).tolist() == [2, 4, 4]


@pytest.mark.parametrize("architecture", ["llama", "gpt2", "opt"])
def test_left_and_right_padding_capture_the_same_activations(architecture: str) -> None:
    model = make_tiny_model(architecture)
    prompts = ragged_prompts()
    single = torch.cat([capture_activations(model, [p], progress=False) for p in prompts])
    for side in ("left", "right"):
        batched = capture_activations(model, prompts, batch_size=4, padding_side=side, progress=False)
        assert batched.shape == (6, 8, 8)  # 2 layers x 4 heads, head_dim 8
        torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)
    everything = capture_activations(model, prompts, position="all", batch_size=4, padding_side="left", progress=False)
    assert everything.shape[0] == sum(len(p) for p in prompts)


def test_identical_models_lose_nothing() -> None:
    model = make_tiny_model("llama")
    components = calibrate(model, model, ragged_prompts(), strategy=None, progress=False)
    assert components.mean.abs().max() < 1e-6
    assert components.singular_values.abs().max() < 1e-5
    assert not any(module._forward_pre_hooks for module in model.modules())  # every hook removed


def _planted_pair():
    dense = make_tiny_model("llama", num_key_value_heads=4)
    pruned = make_tiny_model("llama", num_key_value_heads=4)
    with torch.no_grad():
        pruned.model.layers[1].self_attn.v_proj.weight[8:16] *= 0.3  # head 1 of the last layer
    return dense, pruned


@pytest.mark.parametrize("position", ["last", "all"])
def test_loaders_one_model_at_a_time_match_side_by_side(position: str, tmp_path) -> None:
    dense, pruned = _planted_pair()
    prompts = ragged_prompts(10)
    side_by_side = calibrate(dense, pruned, prompts, strategy=None, position=position, batch_size=3, progress=False)
    loaded = []

    def loader(model):
        return lambda: loaded.append(model) or model

    one_at_a_time = calibrate(
        ModelLoader(loader(dense), config=dense.config, name="dense"),
        loader(pruned),
        prompts,
        strategy=None,
        position=position,
        batch_size=3,
        spool_dir=str(tmp_path),
        progress=False,
    )
    assert loaded == [pruned, dense]  # the pruned model first, each once
    assert list(tmp_path.iterdir()) == []  # the spool is cleaned up
    assert one_at_a_time.metadata["dense_model"] == "dense"
    torch.testing.assert_close(one_at_a_time.mean, side_by_side.mean)
    torch.testing.assert_close(one_at_a_time.singular_values, side_by_side.singular_values, atol=1e-5, rtol=1e-4)
    # The leading direction of the damaged head agrees (up to numerical noise).
    cosine = (one_at_a_time.basis[5, 0] * side_by_side.basis[5, 0]).sum().abs()
    assert cosine > 0.9999


def test_all_position_memory_does_not_grow_with_samples() -> None:
    sizes = {}
    for position in ("all", "last"):
        accumulator = LostAccumulator(position, num_heads=8, head_dim=8)
        grown = []
        for batch in (1, 10):
            for _ in range(batch):
                accumulator.add(torch.randn(64, 8, 8), torch.randn(64, 8, 8))
            grown.append(accumulator.state_nbytes())
        sizes[position] = grown
    assert sizes["all"][0] == sizes["all"][1] == 8 * 8 * 8 * 8 + 8 * 8 * 8  # Gram + sum, float64
    assert sizes["last"][1] > sizes["last"][0]  # the paper's mode keeps the N rows for the exact SVD


def test_gram_basis_matches_svd_basis() -> None:
    generator = torch.Generator().manual_seed(0)
    heads = 40  # more than one SVD chunk of heads
    lost = torch.randn(200, heads, 8, generator=generator) * torch.linspace(3, 0.1, 8)
    by_svd, by_gram = LostAccumulator("last", heads, 8), LostAccumulator("all", heads, 8)
    for chunk in lost.split(50):
        by_svd.add(chunk, torch.zeros_like(chunk))
        by_gram.add(chunk, torch.zeros_like(chunk))
    (basis_a, sv_a, mean_a), (basis_b, sv_b, mean_b) = by_svd.finish(), by_gram.finish()
    torch.testing.assert_close(sv_a, sv_b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mean_a, mean_b)
    torch.testing.assert_close(basis_a, basis_b, atol=1e-3, rtol=1e-3)  # same signs: both point along the mean
    torch.testing.assert_close(basis_a @ basis_a.transpose(1, 2), torch.eye(8).expand(heads, 8, 8), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_hidden_layers": 3}, "layers"),
        ({"head_dim": 16}, "head_dim"),
    ],
)
def test_mismatched_models_fail_before_any_forward(overrides: dict, message: str) -> None:
    dense, other = make_tiny_model("llama"), make_tiny_model("llama", **overrides)
    calls = count_forwards(dense, other)
    with pytest.raises(ValueError, match=message):
        calibrate(dense, other, ragged_prompts(), strategy=None, progress=False)
    with pytest.raises(ValueError, match=message):  # also when the dense model is a loader with a config
        calibrate(ModelLoader(lambda: dense, config=dense.config), other, ragged_prompts(), strategy=None)
    assert calls[0] == 0


def test_vocabulary_and_tokenizer_mismatch() -> None:
    dense, bigger = make_tiny_model("llama"), make_tiny_model("llama")
    bigger.resize_token_embeddings(120)
    calls = count_forwards(dense, bigger)
    with pytest.raises(ValueError, match="Vocabulary size"):
        calibrate(dense, bigger, ragged_prompts(), strategy=None, progress=False)
    with pytest.raises(ValueError, match="does not fit"):
        calibrate(dense, dense, [[5, 6, 200]], strategy=None, progress=False)
    with pytest.raises(ValueError, match="tokenizers have different vocabularies"):
        calibrate(dense, dense, ["ab"], char_tokenizer(), pruned_tokenizer=char_tokenizer("é"), strategy=None)
    assert calls[0] == 0


def _drop_head(model, layer: int, head: int, head_dim: int = 8) -> None:
    """Structurally remove one head (q, k, v rows and o_proj columns) of a Llama without GQA."""
    attention = model.model.layers[layer].self_attn
    keep = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in range(4) if h != head])
    for name in ("q_proj", "k_proj", "v_proj"):
        old = getattr(attention, name)
        new = torch.nn.Linear(old.in_features, len(keep), bias=False)
        new.weight.data = old.weight.data[keep].clone()
        setattr(attention, name, new)
    old = attention.o_proj
    new = torch.nn.Linear(len(keep), old.out_features, bias=False)
    new.weight.data = old.weight.data[:, keep].clone()
    attention.o_proj = new


def test_structured_pruning_needs_and_uses_kept_heads() -> None:
    dense = make_tiny_model("llama", num_key_value_heads=4)
    pruned = make_tiny_model("llama", num_key_value_heads=4)
    _drop_head(pruned, layer=1, head=1)
    prompts = ragged_prompts()
    with pytest.raises(ValueError, match="structurally pruned.*kept_heads"):
        calibrate(dense, pruned, prompts, strategy=None, progress=False)
    with pytest.raises(ValueError, match="kept_heads\\[1\\] lists 2 heads"):
        calibrate(dense, pruned, prompts, strategy=None, kept_heads={1: [0, 2]}, progress=False)
    components = calibrate(dense, pruned, prompts, strategy="lost_norm", kept_heads={"1": [0, 2, 3]}, progress=False)
    assert components.heads_per_layer == [4, 3]
    # Layer 1's kept heads see the same inputs as in the dense model: nothing is lost when mapped right ...
    assert components.mean.abs().max() < 1e-6
    # ... while a wrong mapping (pruned head 1 = dense head 1) shows a loss at that head only.
    wrong = calibrate(dense, pruned, prompts, strategy="lost_norm", kept_heads={1: [0, 1, 3]}, progress=False)
    assert wrong.scores.argmax().item() == 5 and wrong.scores[[0, 1, 2, 3, 4, 6]].max() < 1e-6


def test_models_offloaded_by_accelerate() -> None:
    from accelerate import cpu_offload

    def damaged():
        model = make_tiny_model("llama")
        with torch.no_grad():
            model.model.layers[0].self_attn.v_proj.weight[:8] = 0
            model.model.layers[1].self_attn.o_proj.weight[:, :8] = 0
        return model

    prompts = ragged_prompts()
    plain = calibrate(make_tiny_model("llama"), damaged(), prompts, strategy="lost_norm", progress=False)
    offloaded_pruned = cpu_offload(damaged(), execution_device="cpu")  # weights live on the meta device
    assert offloaded_pruned.model.layers[1].self_attn.o_proj.weight.device.type == "meta"
    offloaded = calibrate(
        cpu_offload(make_tiny_model("llama"), execution_device="cpu"),
        offloaded_pruned,
        prompts,
        strategy="lost_norm",
        progress=False,
    )
    torch.testing.assert_close(offloaded.mean, plain.mean)
    torch.testing.assert_close(offloaded.output_metric, plain.output_metric)
    torch.testing.assert_close(offloaded.scores, plain.scores)
    offloaded.check_matches(damaged())
