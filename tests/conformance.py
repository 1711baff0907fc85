"""Shared set-up of the conformance tests: the architectures and configs every PEFT tuner check runs over."""

from __future__ import annotations

import torch
from peft import get_peft_model
from tiny_models import make_tiny_model, random_input_ids

from peft_restorelcc import RestoreLCCConfig, restorelcc_layers

# Llama: no bias anywhere; Qwen2: q/k/v biases, none on o_proj; GPT-2: Conv1D (weight stored in x out) with a bias;
# OPT: Linear out_proj with a bias.
ARCHITECTURES = ("llama", "qwen2", "gpt2", "opt")
CONFIGS = {
    "all_heads": {},
    "some_heads_k3": {"heads": {0: [1], 1: [0, 3]}, "num_components": 3},
    "bias_only": {"heads": {0: [0, 2], 1: [1]}, "use_components": False},
    "components_only": {"heads": {1: [2, 3]}, "use_bias": False},
}
# Large enough that the adapter moves the logits by ~0.05-0.3 (the logits are ~0.4 at most), far above rounding.
INIT_STD = 0.1
# Every check below first asserts that the adapter changes the logits by more than this.
NON_TRIVIAL = 1e-2


def restorelcc_config(config_name: str = "all_heads", **overrides) -> RestoreLCCConfig:
    # "gaussian": N(0, INIT_STD), non-trivial from the start (init_weights=True would be the identity).
    kwargs = {"init_weights": "gaussian", "init_std": INIT_STD, **CONFIGS[config_name], **overrides}
    return RestoreLCCConfig(task_type="CAUSAL_LM", **kwargs)


@torch.no_grad()
def randomize_basis(model, seed: int = 0) -> None:
    """Orthonormal random rows in place of the identity basis, as calibration would leave them: a basis that is
    transposed, mixed up between heads or lost on reload then changes the output."""
    generator = torch.Generator().manual_seed(seed)
    for layer in restorelcc_layers(model):
        for basis in layer.restorelcc_basis.values():
            num_heads, num_components, head_dim = basis.shape
            square = torch.randn(num_heads, head_dim, head_dim, generator=generator)
            orthonormal = torch.linalg.qr(square).Q.transpose(1, 2)[:, :num_components]
            basis.copy_(orthonormal.to(basis.dtype))


def restorelcc_model(architecture: str, config_name: str = "all_heads", seed: int = 0, dtype=None, **overrides):
    """A tiny base of ``architecture`` wrapped with a non-trivial RestoreLCC adapter (random init and basis)."""
    base = make_tiny_model(architecture)
    if dtype is not None:
        base = base.to(dtype)
    torch.manual_seed(seed)
    model = get_peft_model(base, restorelcc_config(config_name, **overrides)).eval()
    randomize_basis(model, seed)
    return model


def base_logits(architecture: str, inputs: torch.Tensor, dtype=None) -> torch.Tensor:
    base = make_tiny_model(architecture)
    if dtype is not None:
        base = base.to(dtype)
    with torch.no_grad():
        return base(inputs).logits


def logits(model, inputs: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(random_input_ids() if inputs is None else inputs).logits


def assert_non_trivial(adapted: torch.Tensor, base: torch.Tensor) -> None:
    difference = (adapted.float() - base.float()).abs().max().item()
    assert difference > NON_TRIVIAL, f"the adapter changes the logits by only {difference:.2e}: the check is empty"


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-for-bit equality, with the size of the difference in the message."""
    assert actual.dtype == expected.dtype
    assert torch.equal(actual, expected), f"max difference {(actual.float() - expected.float()).abs().max():.3e}"
