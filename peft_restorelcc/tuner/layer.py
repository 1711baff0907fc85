"""The RestoreLCC layer: an attention output projection whose selected heads get ``V^T m + b`` added to their input."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.func import functional_call

from .config import RestoreLCCConfig
from .heads import is_quantized_projection, projection_device, projection_shape, projection_weight, times_weight


def broken_adapter_error(adapter_name: str, layer_index: int) -> ValueError:
    """The safe-merge refusal, in the words PEFT's own tuners use (code matching their message catches it too)."""
    return ValueError(
        f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken: its RestoreLCC "
        f"compensation for layer {layer_index} has non-finite (NaN/inf) values. Nothing was merged."
    )


class RestoreLCCLayer(BaseTunerLayer):
    """Adapter state of one projection, per adapter name:

    - ``restorelcc_basis``: (H_sel, k, d) fixed lost-component basis, a persistent buffer saved with the adapter.
    - ``restorelcc_magnitude``: (H_sel, k) trainable magnitudes m (absent when ``use_components=False``).
    - ``restorelcc_bias``: (H_sel, d) trainable free bias b (absent when ``use_bias=False``).
    - ``restorelcc_head_index``: (H_sel,) which heads of the layer, in row order (derived from the config).
    """

    adapter_layer_names = ("restorelcc_magnitude", "restorelcc_bias")
    other_param_names = ("restorelcc_basis", "restorelcc_head_index")

    def __init__(self, base_layer: nn.Module, layer_index: int, head_dim: int, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.layer_index = layer_index
        self.head_dim = head_dim
        self.restorelcc_magnitude = nn.ParameterDict({})
        self.restorelcc_bias = nn.ParameterDict({})
        self.restorelcc_basis = BufferDict({}, persistent=True)
        # Derived from the config, so not saved: the config is the source of truth for which heads.
        self.restorelcc_head_index = BufferDict({}, persistent=False)
        self.head_indices: dict[str, list[int]] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # The bias as it was before the first merge (None: there was none), restored exactly by unmerge.
        self._bias_before_merge: torch.Tensor | None = None
        self._bias_was_created = False

        in_features, out_features = projection_shape(self.get_base_layer())
        if in_features % head_dim != 0:
            raise ValueError(
                f"Projection input width {in_features} is not divisible by head_dim={head_dim}; the target must be "
                "the attention output projection fed by the concatenated heads."
            )
        self.in_features = in_features
        self.out_features = out_features
        self.num_heads = in_features // head_dim

    def update_layer(self, adapter_name: str, head_indices: list[int], config: RestoreLCCConfig) -> None:
        if not head_indices:
            raise ValueError(f"Layer {self.layer_index}: no heads selected for adapter {adapter_name!r}.")
        out_of_range = [head for head in head_indices if not 0 <= head < self.num_heads]
        if out_of_range:
            raise ValueError(
                f"Layer {self.layer_index} has {self.num_heads} heads (0..{self.num_heads - 1}); head indices "
                f"{out_of_range} are out of range."
            )
        num_components = config.num_components or self.head_dim
        if num_components > self.head_dim:
            raise ValueError(
                f"num_components={num_components} exceeds head_dim={self.head_dim}; use at most head_dim or None."
            )
        num_selected = len(head_indices)
        device = projection_device(self.get_base_layer())
        self.head_indices[adapter_name] = list(head_indices)
        self.restorelcc_head_index[adapter_name] = torch.tensor(head_indices, dtype=torch.long, device=device)
        # Identity rows until calibration fills in the measured lost directions.
        identity_rows = torch.eye(self.head_dim, dtype=torch.float32, device=device)[:num_components]
        self.restorelcc_basis[adapter_name] = identity_rows.expand(num_selected, -1, -1).clone()
        # Adapter parameters stay fp32 whatever the base dtype: they are tiny and their updates are small.
        if config.use_components:
            self.restorelcc_magnitude[adapter_name] = nn.Parameter(
                torch.zeros(num_selected, num_components, dtype=torch.float32, device=device)
            )
        if config.use_bias:
            self.restorelcc_bias[adapter_name] = nn.Parameter(
                torch.zeros(num_selected, self.head_dim, dtype=torch.float32, device=device)
            )
        self.reset_restorelcc_parameters(adapter_name, config.init_weights, config.init_std)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """Device only, never the dtype: PEFT's version also casts to the base dtype (bf16 on a bf16 base, e.g. after a
        ``low_cpu_mem_usage`` load), and an upcast afterwards would not give the saved fp32 values back. The dtype is
        the model's ``_cast_adapter_dtype`` decision (fp32, or the base dtype with ``autocast_adapter_dtype=False``)."""
        if device is None:
            device = projection_device(self.get_base_layer())
        if device.type == "meta":
            return
        for name in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, name)
            if adapter_name in container and container[adapter_name].device != torch.device("meta"):
                container[adapter_name] = container[adapter_name].to(device)

    def cast_adapter_to_base_dtype(self, adapter_name: str) -> None:
        """Floating adapter tensors to the base weight's dtype (``autocast_adapter_dtype=False``)."""
        base_layer = self.get_base_layer()
        if is_quantized_projection(base_layer):
            return  # its weight dtype is the storage (int8, uint8), not a compute dtype: stay fp32
        dtype = projection_weight(base_layer).dtype
        if not dtype.is_floating_point:
            return
        for name in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, name)
            if adapter_name in container and container[adapter_name].is_floating_point():
                container[adapter_name] = container[adapter_name].to(dtype)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.head_indices.pop(adapter_name, None)

    def reset_restorelcc_parameters(self, adapter_name: str, init_weights: bool | str, init_std: float) -> None:
        """``True``: zeros (identity); ``False``: N(0, 1) (random); ``"gaussian"``: N(0, init_std) (the paper).

        Magnitudes are drawn before the bias, the order of earlier versions, so a seeded "gaussian" run draws the
        same numbers as the old ``init_weights=True``.
        """
        if init_weights is True:
            std = None
        elif init_weights is False:
            std = 1.0
        elif init_weights == "gaussian":
            std = init_std
        else:
            raise ValueError(f"Unknown init_weights={init_weights!r}; use True, False or 'gaussian'.")
        for parameters in (self.restorelcc_magnitude, self.restorelcc_bias):
            if adapter_name in parameters:
                if std is None:
                    nn.init.zeros_(parameters[adapter_name])
                else:
                    nn.init.normal_(parameters[adapter_name], mean=0.0, std=std)

    def head_vectors(self, adapter_name: str) -> torch.Tensor:
        """(H_sel, d): the vector added to each selected head's input slice, ``m @ V + b`` for all heads at once."""
        # Always in fp32: under mixed precision (FSDP's param_dtype, a bf16 cast of the whole model) the trained
        # tensors may arrive in half precision while the fixed basis buffer does not; .float() is free on fp32.
        basis = self.restorelcc_basis[adapter_name].float()
        vectors = basis.new_zeros(basis.shape[0], basis.shape[2])
        if adapter_name in self.restorelcc_magnitude:
            magnitude = self.restorelcc_magnitude[adapter_name].float()
            vectors = vectors + torch.einsum("hk,hkd->hd", magnitude, basis)
        if adapter_name in self.restorelcc_bias:
            vectors = vectors + self.restorelcc_bias[adapter_name].float()
        return vectors

    def input_shift(self, adapter_names: list[str]) -> torch.Tensor | None:
        """(in_features,) fp32: the sum over adapters of their head vectors, placed at their heads' slices."""
        shift = None
        for adapter_name in adapter_names:
            if adapter_name not in self.restorelcc_basis:
                continue
            per_head = self.restorelcc_basis[adapter_name].new_zeros(self.num_heads, self.head_dim, dtype=torch.float32)
            per_head = per_head.index_add(0, self.restorelcc_head_index[adapter_name], self.head_vectors(adapter_name))
            shift = per_head if shift is None else shift + per_head
        return None if shift is None else shift.reshape(self.in_features)

    def output_shift(self, adapter_names: list[str]) -> torch.Tensor | None:
        """(out_features,): the input shift seen through the projection weight, ``W @ shift``, in the weight's dtype.

        The product runs in the weight's dtype so that autograd keeps no fp32 copy of a half-precision weight. A
        quantized projection computes it with its own kernel (``layer(shift) - bias``, fp32 out), never reading
        its packed weight as a matrix.
        """
        shift = self.input_shift(adapter_names)
        if shift is None:
            return None
        base_layer = self.get_base_layer()
        if is_quantized_projection(base_layer):
            return times_weight(base_layer, shift)
        weight = projection_weight(base_layer)
        return torch.mv(weight, shift.to(weight.dtype))

    def shift_is_finite(self, adapter_name: str) -> bool:
        return bool(torch.isfinite(self.output_shift([adapter_name])).all())

    def shifted_bias(self, adapter_names: list[str]) -> torch.Tensor | None:
        """The projection's bias plus ``W @ shift``, summed in fp32 and rounded once to the bias dtype: exactly what
        merging writes into the bias, so merged and unmerged outputs are the same bit for bit in every dtype."""
        output_shift = self.output_shift(adapter_names)
        if output_shift is None:
            return None
        bias = self.get_base_layer().bias
        if bias is None:
            return output_shift
        return (bias.float() + output_shift.float()).to(bias.dtype)


class Linear(nn.Module, RestoreLCCLayer):
    """A Linear or GPT-2 Conv1D output projection with RestoreLCC head compensation."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        head_indices: list[int],
        layer_index: int,
        config: RestoreLCCConfig,
        head_dim: int,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        RestoreLCCLayer.__init__(self, base_layer, layer_index=layer_index, head_dim=head_dim)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, head_indices, config)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold ``W @ shift`` into the projection's bias (created if absent). The weight is never touched."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [name for name in adapter_names if name in self.restorelcc_basis]
        if not adapter_names:
            return
        base_layer = self.get_base_layer()
        if safe_merge:
            # Checked per adapter and before anything is written, so a broken adapter leaves the layer untouched.
            for adapter_name in adapter_names:
                if not self.shift_is_finite(adapter_name):
                    raise broken_adapter_error(adapter_name, self.layer_index)
        with torch.no_grad():
            new_bias = self.shifted_bias(adapter_names).detach()
        if safe_merge and not torch.isfinite(new_bias).all():
            raise ValueError(
                f"NaNs detected in the merged weights. The adapter {adapter_names[0]} seems to be broken: merging "
                f"{adapter_names} into layer {self.layer_index} gives a non-finite bias. Nothing was merged."
            )
        old_bias = base_layer.bias
        if not self.merged:
            self._bias_before_merge = None if old_bias is None else old_bias.detach().clone()
            self._bias_was_created = old_bias is None
        if old_bias is None:
            # A quantized layer's kernel adds the bias in the compute dtype (bitsandbytes casts it there in place).
            base_layer.bias = nn.Parameter(new_bias, requires_grad=False)
        else:
            old_bias.data = new_bias
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        """Restore the bias exactly as it was before the first merge (removing a bias that merge created)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base_layer = self.get_base_layer()
        if self._bias_was_created:
            base_layer.bias = None
        else:
            base_layer.bias.data = self._bias_before_merge.to(base_layer.bias.device)
        self.merged_adapters.clear()
        self._bias_before_merge = None
        self._bias_was_created = False

    def forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any
    ) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, adapter_names, *args, **kwargs)
        active = list(self.active_adapters)
        if isinstance(self.base_layer, BaseTunerLayer) or is_quantized_projection(self.get_base_layer()):
            # Another tuner's layer sits inside, or a quantized layer whose kernel may add a bias in place (so no
            # bias that carries gradients can be swapped in): let it run, then add the shift.
            result = self.base_layer(x, *args, **kwargs)
            output_shift = self.output_shift(active)
            return result if output_shift is None else result + output_shift.to(result.dtype)
        # Adding the shift to the heads' input and projecting equals adding W @ shift to the bias: one
        # matrix-vector product per forward instead of touching every token's activations. The projection runs with
        # the bias that merging would write (functional_call swaps it in for this call, keeping the module's hooks
        # and gradients to m and b), so merging changes no output, bit for bit.
        bias = self.shifted_bias(active)
        if bias is None:
            return self.base_layer(x, *args, **kwargs)
        return functional_call(self.base_layer, {"bias": bias}, (x, *args), kwargs)

    def _mixed_batch_forward(
        self, x: torch.Tensor, adapter_names: list[str], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Sample i gets the shift of ``adapter_names[i]`` (none for ``"__base__"`` or an adapter absent here)."""
        if len(adapter_names) != x.shape[0]:
            raise ValueError(
                f"adapter_names has {len(adapter_names)} entries but the batch has {x.shape[0]} samples; pass one "
                "adapter name per sample."
            )
        result = self.base_layer(x, *args, **kwargs)
        per_sample = result.new_zeros(len(adapter_names), self.out_features)
        # One matrix-vector product per distinct adapter, not per sample.
        for adapter_name in dict.fromkeys(adapter_names):
            if adapter_name in self.restorelcc_basis:
                rows = [index for index, name in enumerate(adapter_names) if name == adapter_name]
                per_sample[rows] = self.output_shift([adapter_name]).to(result.dtype)
        return result + per_sample.view(len(adapter_names), *([1] * (result.dim() - 2)), self.out_features)

    def __repr__(self) -> str:
        return "restorelcc." + super().__repr__()
