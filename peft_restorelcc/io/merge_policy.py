"""The family merge policy: a merged RestoreLCC model that stock transformers reloads with its compensation intact.

Merging puts the compensation into the attention output projection's bias. Many architectures build that
projection without a bias unless the config says otherwise, and a stock ``from_pretrained`` then drops the saved
bias as an unexpected key. Where the config has a switch (``attention_bias``), we turn it on and give the sibling
q/k/v projections zero biases so the saved model matches what the switch builds; where it has none, we refuse.

It imports the tuner only: the package installs it as soon as the tuner loads.
"""

from __future__ import annotations

import torch
from torch import nn

from ..tuner.heads import find_head_projections, model_types_with_output_bias, text_config
from ..tuner.layer import RestoreLCCLayer
from ..tuner.model import MergePolicy, RestoreLCCModel

# Both from the tuner's one architecture table.
# Architectures whose config switch `attention_bias` adds a bias to q/k/v and the output projection.
ATTENTION_BIAS_SWITCH = model_types_with_output_bias("switch")
# Architectures whose output projection bias is hard-coded off: no config can carry a merged compensation.
NO_OUTPUT_BIAS = model_types_with_output_bias("never")

def model_type_of(model: nn.Module) -> str | None:
    return getattr(text_config(model), "model_type", None)


def _output_projections(model: nn.Module) -> list[nn.Module]:
    """The projections RestoreLCC wraps (their base layers), or, in a merged model, the architecture's defaults."""
    wrapped = [module.get_base_layer() for module in model.modules() if isinstance(module, RestoreLCCLayer)]
    if wrapped:
        return wrapped
    return [model.get_submodule(projection.name) for projection in find_head_projections(model)]


def bias_reload_problem(model: nn.Module) -> str | None:
    """Why a stock reload of this architecture would drop an output-projection bias, or None if it would not."""
    if getattr(model, "config", None) is None:
        return None  # Not a transformers model: no config-driven reload to lose the bias in.
    model_type = model_type_of(model)
    if model_type in NO_OUTPUT_BIAS:
        return (
            f"the {model_type} architecture has no config switch for an attention output bias (save it with "
            "peft_restorelcc.io.export.save_merged or `restorelcc merge`, which write the exactly equivalent Llama)."
        )
    if model_type in ATTENTION_BIAS_SWITCH:
        return None
    projections = _output_projections(model)
    if all(getattr(projection, "bias", None) is not None for projection in projections):
        return None  # The architecture builds the bias itself (OPT, GPT-2, Phi).
    return f"RestoreLCC does not know how the {model_type!r} config expresses an attention output bias."


@torch.no_grad()
def make_output_bias_reloadable(model: nn.Module) -> bool:
    """After a merge: switch ``attention_bias`` on and add zero q/k/v biases, so every attention projection
    carries the bias the switch makes the architecture build. Returns True if the model was changed."""
    if model_type_of(model) not in ATTENTION_BIAS_SWITCH:
        return False
    config = text_config(model)
    projections = _output_projections(model)
    if getattr(config, "attention_bias", False) or all(projection.bias is None for projection in projections):
        return False
    for projection in find_head_projections(model):
        attention = model.get_submodule(projection.name.rsplit(".", 1)[0])
        for linear in attention.children():
            if isinstance(linear, nn.Linear) and linear.bias is None:
                # A quantized layer's weight dtype is its storage (int8, uint8): its bias is a float.
                dtype = linear.weight.dtype if linear.weight.dtype.is_floating_point else torch.float32
                linear.bias = nn.Parameter(
                    torch.zeros(linear.out_features, dtype=dtype, device=linear.weight.device),
                    requires_grad=False,
                )
    config.attention_bias = True
    if config is not model.config and hasattr(model.config, "attention_bias"):
        model.config.attention_bias = True
    return True


# The policy the tuner applies in every merge_and_unload: warn where a stock reload would drop the bias, switch the
# config on where it can carry it. Installed by install_merge_policy() when the tuner loads.
MERGE_POLICY = MergePolicy(reload_problem=bias_reload_problem, finish_merged=make_output_bias_reloadable)


def install_merge_policy() -> None:
    """Make every RestoreLCC ``merge_and_unload`` give a model that stock ``from_pretrained`` reloads with its bias."""
    RestoreLCCModel.merge_policy = MERGE_POLICY
