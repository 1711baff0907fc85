"""Masked LoRA: PEFT's LoRA whose update keeps a pruned model's zeros, in training, at inference and in the merge.

The update of a layer is ``((B @ A) * scaling) * M``, with ``M`` the base weight's non-zero mask (SQFT's SparsePEFT,
LoRS and LoSA train this). ``merge_and_unload`` adds the masked update, so every weight the pruning zeroed is still
exactly zero in the merged model: its sparsity is the pruned model's. It is built on PEFT's own LoRA, as DoRA is:

- ``MaskedLoraConfig`` is a ``LoraConfig`` (every LoRA option: r, lora_alpha, target_modules, rank_pattern, ...) of
  its own ``peft_type``, ``MASKED_LORA``, so a saved adapter says it is masked: ``PeftModel.from_pretrained`` and
  ``AutoPeftModelForCausalLM`` rebuild it masked, and a stock LoRA loader cannot mistake it for a plain LoRA (whose
  unmerged forward would not be masked).
- ``MaskedLoraModel`` is PEFT's ``LoraModel`` with ``Linear`` layers (``nn.Linear`` and transformers' ``Conv1D``)
  whose LoRA variant (``MaskedLoraVariant``, PEFT's ``LoraVariant`` interface: init, forward, merge, unmerge) applies
  the mask. The mask is not saved: it is recomputed from the base weight when the adapter is built or loaded (a
  boolean buffer per layer, one byte per base weight, not in the state dict).

Cost: the forward materialises the masked update, an ``out x in`` matrix, per adapted layer (plain LoRA only goes
through ``r``-wide activations), and autograd keeps it for the backward pass: training holds about one dense copy of
every adapted weight more than LoRA does (docs/compare.md gives the measured figures). The merged model costs what the
pruned one does.

Importing ``peft_restorelcc`` registers the method with PEFT (an installed package does so on ``import peft``)::

    from peft import get_peft_model, PeftModel
    from peft_restorelcc.compare.masked_lora import MaskedLoraConfig

    model = get_peft_model(pruned, MaskedLoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    ...  # train
    model.save_pretrained("adapter")
    model = PeftModel.from_pretrained(pruned_again, "adapter")  # masked again
    merged = model.merge_and_unload()  # the pruned model's zeros, exactly

This module imports torch, peft and the tuner (for the enum member) only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora import LoraModel
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraVariant
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import transpose
from torch import nn

from ..tuner import peft_type_member

__all__ = ["PEFT_TYPE", "MaskedLinear", "MaskedLoraConfig", "MaskedLoraModel", "MaskedLoraVariant", "register"]

PEFT_TYPE = "MASKED_LORA"
MASK_BUFFER = "lora_sparsity_mask"  # the base weight's non-zero mask, per layer (not saved: recomputed from the base)


@dataclass
class MaskedLoraConfig(LoraConfig):
    """``LoraConfig`` for a LoRA whose update is masked by the base weight's non-zero pattern (every LoRA option
    applies; DoRA and the other LoRA variants do not combine with the mask and are refused)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = peft_type_member(PEFT_TYPE)
        if self.use_dora:
            raise ValueError("MaskedLoraConfig: use_dora does not combine with the sparsity mask")


class MaskedLoraVariant(LoraVariant):
    """The mask, as a PEFT LoRA variant: the update ``get_delta_weight`` (``B @ A * scaling``, in the base weight's
    layout) is zeroed wherever the base weight is zero, in the forward pass and in merge and unmerge."""

    def supports_lora_conversion(self) -> bool:
        return False  # a plain LoRA cannot carry the mask

    @staticmethod
    def init(module: LoraLinear, adapter_name: str, **kwargs: Any) -> None:
        if not hasattr(module, MASK_BUFFER):  # one mask per layer, shared by its adapters: it is the base weight's
            weight = module.get_base_layer().weight
            module.register_buffer(MASK_BUFFER, weight.detach() != 0, persistent=False)

    @staticmethod
    def masked_delta(module: LoraLinear, adapter_name: str) -> torch.Tensor:
        """The update in the base weight's layout, exactly zero where the base weight is zero."""
        mask = getattr(module, MASK_BUFFER)
        delta = module.get_delta_weight(adapter_name)
        return torch.where(mask.to(delta.device), delta, torch.zeros((), dtype=delta.dtype, device=delta.device))

    @staticmethod
    def forward(module: LoraLinear, *, active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs: Any) -> torch.Tensor:  # fmt: skip
        delta = MaskedLoraVariant.masked_delta(module, active_adapter)
        dropout = module.lora_dropout[active_adapter]
        weight = transpose(delta, module.fan_in_fan_out)  # (out, in), as F.linear takes it
        return result + F.linear(dropout(x), weight.to(x.dtype))

    @staticmethod
    def merge_safe(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + MaskedLoraVariant.masked_delta(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += MaskedLoraVariant.masked_delta(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight.data - MaskedLoraVariant.masked_delta(module, active_adapter).to(orig_weight.dtype)


class MaskedLinear(LoraLinear):
    """PEFT's LoRA ``Linear`` whose adapters of a ``MaskedLoraConfig`` take the masked variant."""

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs: Any) -> LoraVariant | None:
        if isinstance(config, MaskedLoraConfig):
            return MaskedLoraVariant()
        return super().resolve_lora_variant(config=config, **kwargs)


class MaskedLoraModel(LoraModel):
    """PEFT's ``LoraModel`` building ``MaskedLinear`` layers: linear targets only (``nn.Linear``, transformers'
    ``Conv1D``); a pruned model's sparsity lives in its linear weights."""

    @staticmethod
    def _create_new_module(lora_config: LoraConfig, adapter_name: str, target: nn.Module, **kwargs: Any) -> nn.Module:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        conv1d = type(base).__name__ == "Conv1D" and hasattr(base, "nf")  # transformers' GPT-2 style linear
        if kwargs.get("parameter_name") is not None or not (isinstance(base, nn.Linear) or conv1d):
            raise ValueError(
                f"masked LoRA adapts linear layers only, not {type(base).__name__} "
                f"({kwargs.get('target_name', '')}): narrow target_modules"
            )
        if kwargs.get("loaded_in_8bit") or kwargs.get("loaded_in_4bit"):
            raise ValueError("masked LoRA needs the base weights in a float dtype (not 8-bit or 4-bit)")
        lora_config.fan_in_fan_out = conv1d
        kwargs.pop("parameter_name", None)
        return MaskedLinear(target, adapter_name, config=lora_config, is_target_conv_1d_layer=conv1d, **kwargs)


def register() -> None:
    """Make MASKED_LORA a PEFT method (idempotent): the ``PeftType`` member, then the entries of PEFT's tables that
    ``register_peft_method`` would write. Written directly: that function refuses the ``lora_`` prefix, which LoRA
    holds, and the adapter's parameters are LoRA's (``lora_A``, ``lora_B``)."""
    from peft import mapping

    peft_type = peft_type_member(PEFT_TYPE)
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = MaskedLoraConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = MaskedLoraModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = MaskedLoraModel.prefix


register()
