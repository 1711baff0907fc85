"""RestoreLCCModel: the PEFT tuner that wraps attention output projections with RestoreLCC layers."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from torch import nn

from .config import RestoreLCCConfig
from .fingerprint import weights_fingerprint
from .heads import (
    DEFAULT_TARGET_MODULES,
    default_target_module,
    find_head_projections,
    layer_index_of,
    matches_target,
    model_head_dim,
    projection_shape,
    unsupported_projection_reason,
)
from .layer import Linear, RestoreLCCLayer, broken_adapter_error


def restorelcc_layers(model: nn.Module) -> Iterator[RestoreLCCLayer]:
    """Every RestoreLCC layer of a (Peft)model, in module order."""
    for module in model.modules():
        if isinstance(module, RestoreLCCLayer):
            yield module


_warned_bases: set[tuple[str, str]] = set()


def warn_if_other_base(model: nn.Module, config: RestoreLCCConfig) -> bool:
    """Warn (once per pair of weights) when the adapter records the fingerprint of the model it was made on and
    ``model`` was loaded from a directory with other weights: it still loads, as PEFT loads any adapter whose shapes
    fit, but its compensation was measured for another model. True when it warned."""
    source = getattr(model, "name_or_path", None)
    if not config.base_model_fingerprint or not source:
        return False
    current = weights_fingerprint(source)
    pair = (config.base_model_fingerprint, current or "")
    if current is None or current == config.base_model_fingerprint or pair in _warned_bases:
        return False
    _warned_bases.add(pair)
    warnings.warn(
        f"This RestoreLCC adapter was made on {config.base_model_name_or_path or 'another model'} (weights "
        f"{config.base_model_fingerprint[:19]}), but the base model loaded from {source} has other weights "
        f"({current[:19]}): its compensation was measured and trained for the other model. Load it onto the model "
        "it names.",
        UserWarning,
        stacklevel=3,
    )
    return True


@dataclass(frozen=True)
class MergePolicy:
    """How a merged model must look so that the bias a merge wrote survives ``save_pretrained`` + a stock reload.

    That depends on the model family (which config switch builds an output-projection bias), so the tuner does not
    decide it: a package that knows the families installs a policy as ``RestoreLCCModel.merge_policy``.

    ``reload_problem(model)``: why a stock reload would drop the merged bias, or None; called before merging, a
    reason becomes a warning. ``finish_merged(model)``: called on the unwrapped model after ``merge_and_unload``
    (e.g. to switch the config's bias flag on).
    """

    reload_problem: Callable[[nn.Module], str | None]
    finish_merged: Callable[[nn.Module], Any]


def projections_without_bias(model: nn.Module) -> list[str]:
    """Names of wrapped projections whose base layer has no bias: merging creates one there."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, RestoreLCCLayer) and not module.merged and module.get_base_layer().bias is None
    ]


def generic_reload_problem(model: nn.Module) -> str | None:
    """The family-free fallback when no policy is installed: only say that a bias is created where there was none."""
    created = projections_without_bias(model)
    if not created:
        return None
    return (
        f"{len(created)} projection(s) (e.g. {created[0]}) have no bias, and whether the model's config makes "
        "from_pretrained build one is not known to the tuner."
    )


class RestoreLCCModel(BaseTuner):
    """RestoreLCC (NeurIPS 2025): compensate selected attention heads of a pruned model with the components
    that pruning removed from their outputs.

    Example:

        ```py
        >>> import peft_restorelcc  # registers the method with PEFT
        >>> from peft import get_peft_model
        >>> config = peft_restorelcc.RestoreLCCConfig(heads={3: [0, 5], 7: [2]}, task_type="CAUSAL_LM")
        >>> model = get_peft_model(pruned_model, config)
        ```
    """

    prefix: str = "restorelcc_"
    tuner_layer_cls = RestoreLCCLayer
    target_module_mapping = {model_type: [suffix] for model_type, suffix in DEFAULT_TARGET_MODULES.items()}
    # Installed by the package that knows the model families (peft_restorelcc.io.merge_policy); None = PEFT's plain merge
    # plus a family-free warning when a merge creates a bias.
    merge_policy: ClassVar[MergePolicy | None] = None

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        # Every check runs before the first module is replaced, so bad input leaves the model as it was.
        self._validate_against_model(model, self.peft_config[adapter_name])
        warn_if_other_base(model, self.peft_config[adapter_name])
        super().inject_adapter(model, adapter_name, *args, **kwargs)

    def _validate_against_model(self, model: nn.Module, config: RestoreLCCConfig) -> None:
        if config.target_modules is None:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            config.target_modules = set(self.target_module_mapping.get(model_type, []))
            if not config.target_modules:
                default_target_module(model)  # raises the explanatory error for unknown architectures
        for name, module in model.named_modules():
            if not name or not check_target_module_exists(config, name):
                continue
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            reason = unsupported_projection_reason(base)
            if reason is not None:
                raise ValueError(f"Target module {name}: {reason}")
        head_dim = self._resolve_head_dim(model, config)
        if config.num_components is not None and config.num_components > head_dim:
            raise ValueError(
                f"num_components={config.num_components} exceeds head_dim={head_dim}; use at most head_dim or None."
            )
        projections = find_head_projections(model, config.target_modules, head_dim)
        if config.num_layers is not None and config.num_layers != len(projections):
            raise ValueError(
                f"This RestoreLCC adapter was made for a model with {config.num_layers} attention layers, but the "
                f"base model has {len(projections)}. Load it onto the model it was calibrated for."
            )
        heads_per_layer = {projection.layer_index: projection.num_heads for projection in projections}
        counts = [projection.num_heads for projection in projections]
        if config.heads_per_layer is not None and list(config.heads_per_layer) != counts:
            raise ValueError(
                f"This RestoreLCC adapter was made for a model with {list(config.heads_per_layer)} heads per attention "
                f"layer, but the base model has {counts}. Load it onto the model it was calibrated for."
            )
        _check_heads_in_range(config, heads_per_layer)
        _drop_unwrapped_heads(config, projections)
        # Where each target sits, for _check_target_module_exists and _create_and_replace (names without a layer
        # number get their position among the targets).
        self._layer_index_by_name = {
            **getattr(self, "_layer_index_by_name", {}),
            **{projection.name: projection.layer_index for projection in projections},
        }
        # Record what the adapter was made for, so a reload onto another base fails clearly.
        config.head_dim = head_dim
        config.num_layers = len(projections)
        config.heads_per_layer = counts
        config.num_components = config.num_components or head_dim

    @staticmethod
    def _resolve_head_dim(model: nn.Module, config: RestoreLCCConfig) -> int:
        """The head width: from ``config.num_heads`` (the widest target's input split into that many heads), else
        ``config.head_dim``, else the model's transformers config; checked against the latter when it has one."""
        from_model = model_head_dim(model)
        head_dim = config.head_dim
        if config.num_heads is not None:
            widths = [
                projection_shape(module.get_base_layer() if isinstance(module, BaseTunerLayer) else module)[0]
                for name, module in model.named_modules()
                if name and matches_target(name, config.target_modules)
            ]
            if not widths:
                raise ValueError(
                    f"No module of {type(model).__name__} matches target_modules={config.target_modules!r}."
                )
            widest = max(widths)
            if widest % config.num_heads != 0:
                raise ValueError(
                    f"num_heads={config.num_heads} does not divide the target projections' input width {widest}."
                )
            derived = widest // config.num_heads
            if head_dim is not None and head_dim != derived:
                raise ValueError(
                    f"num_heads={config.num_heads} gives head_dim={derived} for input width {widest}, but "
                    f"head_dim={head_dim} was given. Set one of them, or both consistently."
                )
            head_dim = derived
        if head_dim is None:
            head_dim = from_model
        if head_dim is None:
            raise ValueError(
                f"{type(model).__name__} has no transformers config that gives its attention head layout "
                "(head_dim, or hidden_size and num_attention_heads). Set it in RestoreLCCConfig: num_heads (heads "
                "per target projection; head_dim = its input width / num_heads) or head_dim."
            )
        if from_model is not None and head_dim != from_model:
            raise ValueError(
                f"This RestoreLCC adapter was made for head_dim={head_dim}, but the base model has "
                f"head_dim={from_model}. Load it onto the model it was calibrated for."
            )
        return head_dim

    def _layer_index(self, key: str) -> int:
        known = getattr(self, "_layer_index_by_name", {})
        return known[key] if key in known else layer_index_of(key)

    def _check_target_module_exists(self, config: RestoreLCCConfig, key: str) -> bool | object:
        matched = check_target_module_exists(config, key)
        if not matched:
            # Returned as it is: PEFT tells an excluded module (a falsy marker) from an unmatched one.
            return matched
        return config.heads is None or self._layer_index(key) in config.heads

    def _create_and_replace(
        self,
        config: RestoreLCCConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs,
    ) -> None:
        layer_index = self._layer_index(current_key)
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        num_heads = projection_shape(base)[0] // config.head_dim
        head_indices = config.heads[layer_index] if config.heads is not None else list(range(num_heads))
        if isinstance(target, RestoreLCCLayer):
            target.update_layer(adapter_name, head_indices, config)
            return
        new_module = Linear(
            target,
            adapter_name,
            head_indices=head_indices,
            layer_index=layer_index,
            config=config,
            head_dim=config.head_dim,
        )
        if adapter_name not in self.active_adapters:
            # An additional adapter is not trainable until it is made active.
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _post_injection_hook(self, model: nn.Module, config: RestoreLCCConfig, adapter_name: str) -> None:
        # PEFT's model card takes the base model's tags: say which method made the adapter.
        if hasattr(model, "add_model_tags"):
            model.add_model_tags(["restorelcc"])

    def _check_merge_allowed(self) -> None:
        super()._check_merge_allowed()
        policy = type(self).merge_policy
        reason = generic_reload_problem(self.model) if policy is None else policy.reload_problem(self.model)
        if reason is not None:
            warnings.warn(
                f"Merging RestoreLCC puts the compensation into the attention output projection's bias, but {reason} "
                "A stock from_pretrained of the saved merged model may drop it. Keep the adapter separate "
                "(PeftModel.from_pretrained) for this architecture.",
                stacklevel=3,
            )

    def _check_finite_before_merge(self, adapter_names: list[str] | None) -> None:
        """Every layer's compensation checked before the first is merged: PEFT merges layer by layer, so a NaN in
        the last layer would otherwise leave the earlier ones merged (and, in merge_and_unload, unwrapped)."""
        for layer in restorelcc_layers(self.model):
            names = layer.active_adapters if adapter_names is None else adapter_names
            for adapter_name in names:
                if adapter_name in layer.restorelcc_basis and not layer.shift_is_finite(adapter_name):
                    raise broken_adapter_error(adapter_name, layer.layer_index)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        if safe_merge:
            self._check_finite_before_merge(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        if merge and safe_merge:
            self._check_finite_before_merge(adapter_names)
        model = super()._unload_and_optionally_merge(
            merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        policy = type(self).merge_policy
        if merge and policy is not None:
            # A bias the merge created must survive save_pretrained + a stock reload (e.g. switch the config on).
            policy.finish_merged(model)
        return model

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's convention: adapter tensors in fp32 by default, in the base layer's dtype with
        ``autocast_adapter_dtype=False``.

        RestoreLCC creates them in fp32 and moves them between devices without a dtype change (see
        ``RestoreLCCLayer._move_adapter_to_device_of_base_layer``), so the default cast only has work with tensors
        that came in at half precision, and a fp32 adapter loads bit for bit with or without ``low_cpu_mem_usage``.
        """
        if autocast_adapter_dtype:
            super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=True)
            return
        for layer in restorelcc_layers(self.model):
            layer.cast_adapter_to_base_dtype(adapter_name)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """Mixed adapter batches, as in PEFT's LoRA: ``model(..., adapter_names=[one name per sample])``, with
        ``"__base__"`` for no adapter. Without this hook PeftModel would drop the argument silently."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode; call model.eval().")
        if not isinstance(adapter_names, (list, tuple)):
            raise TypeError(f"adapter_names must be a list of adapter names, one per sample; got {adapter_names!r}.")
        unknown = sorted({name for name in adapter_names if name != "__base__"} - set(self.peft_config))
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}.")
        if any(layer.merged for layer in restorelcc_layers(self.model)):
            raise ValueError("Cannot pass `adapter_names` while adapters are merged; call unmerge_adapter() first.")
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:
            # Beam search repeats every sample num_beams times.
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]

        def inject(module, args, module_kwargs):
            module_kwargs["adapter_names"] = adapter_names
            return args, module_kwargs

        handles = [layer.register_forward_pre_hook(inject, with_kwargs=True) for layer in restorelcc_layers(self.model)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def delete_adapter(self, adapter_name: str) -> None:
        # PEFT takes the new active adapter from the first layer it visits. A RestoreLCC adapter may be absent from
        # that layer (its heads are in other layers), which left no active adapter while others remained. Choose at
        # the model level instead, and set it on every layer alike.
        active_before = list(self.active_adapters)
        super().delete_adapter(adapter_name)
        if adapter_name in active_before and self.peft_config:
            remaining_active = [name for name in active_before if name != adapter_name]
            self.set_adapter(remaining_active or next(iter(self.peft_config)))

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        """Add ``adapter_name``, whose vector at every head is ``sum_i weights[i] * (m_i V_i + b_i)`` of ``adapters``.

        RestoreLCC adds a constant per head, so this weighted sum is exact (it is what the weighted adapters would
        add together). The result is a per-head bias (``use_components=False``) on the union of their heads: their
        bases differ, so no single basis and magnitudes can hold it.
        """
        if len(adapters) != len(weights) or not adapters:
            raise ValueError(f"Pass one weight per adapter; got adapters={adapters} and weights={weights}.")
        unknown = [name for name in adapters if name not in self.peft_config]
        if unknown:
            raise ValueError(f"Adapters {unknown} do not exist; existing adapters: {list(self.peft_config)}.")
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} already exists; choose a new name or delete it first.")
        first = self.peft_config[adapters[0]]
        if any(self.peft_config[name].target_modules != first.target_modules for name in adapters):
            raise ValueError(
                f"Adapters {adapters} target different modules; only adapters on the same projections can be combined."
            )
        heads: dict[int, list[int]] = {}
        for layer in restorelcc_layers(self.model):
            union = sorted({head for name in adapters for head in layer.head_indices.get(name, [])})
            if union:
                heads[layer.layer_index] = union
        self.peft_config[adapter_name] = replace(
            first, heads=heads, use_components=False, use_bias=True, init_weights=True
        )
        self.inject_adapter(self.model, adapter_name)
        with torch.no_grad():
            for layer in restorelcc_layers(self.model):
                if adapter_name not in layer.restorelcc_bias:
                    continue
                combined = layer.restorelcc_bias[adapter_name]
                row_of_head = {head: row for row, head in enumerate(layer.head_indices[adapter_name])}
                for name, weight in zip(adapters, weights):
                    if name in layer.restorelcc_basis:
                        rows = [row_of_head[head] for head in layer.head_indices[name]]
                        combined[rows] += weight * layer.head_vectors(name)

    @torch.no_grad()
    def set_head_state(self, adapter_name: str, layer_index: int, **tensors: torch.Tensor) -> None:
        """Copy ``basis``/``magnitude``/``bias`` tensors (rows in head order) into one layer's adapter."""
        for layer in restorelcc_layers(self.model):
            if layer.layer_index == layer_index and adapter_name in layer.restorelcc_basis:
                for key, value in tensors.items():
                    getattr(layer, f"restorelcc_{key}")[adapter_name].copy_(value)
                return
        raise ValueError(f"Layer {layer_index} has no RestoreLCC adapter {adapter_name!r}.")


def _check_heads_in_range(config: RestoreLCCConfig, heads_per_layer: dict[int, int]) -> None:
    """Every layer ``heads`` names is an attention layer of the model, and every head index exists there."""
    for layer_index, head_indices in (config.heads or {}).items():
        if layer_index not in heads_per_layer:
            raise ValueError(
                f"heads names layer {layer_index}, but the model's attention layers are "
                f"{min(heads_per_layer)}..{max(heads_per_layer)}."
            )
        num_heads = heads_per_layer[layer_index]
        out_of_range = [head for head in head_indices if head >= num_heads]
        if out_of_range:
            raise ValueError(
                f"Layer {layer_index} has {num_heads} heads (0..{num_heads - 1}); head indices {out_of_range} "
                "are out of range."
            )


def _drop_unwrapped_heads(config: RestoreLCCConfig, projections: list) -> None:
    """Heads in layers that ``layers_to_transform`` or ``exclude_modules`` leave out are dropped from the config."""
    if config.heads is not None:
        # As PEFT intersects its own selections: heads in layers that layers_to_transform or exclude_modules
        # leave out are dropped, with a warning, and the config keeps what was actually wrapped.
        wrapped = {p.layer_index for p in projections if check_target_module_exists(config, p.name)}
        dropped = sorted(set(config.heads) - wrapped)
        if dropped:
            if not set(config.heads) & wrapped:
                raise ValueError(
                    f"heads names only layers {dropped}, which layers_to_transform={config.layers_to_transform} "
                    f"/ exclude_modules={config.exclude_modules} leave out: nothing would be compensated."
                )
            warnings.warn(
                f"heads names layers {dropped}, which layers_to_transform={config.layers_to_transform} / "
                f"exclude_modules={config.exclude_modules} leave out; their heads are not compensated.",
                UserWarning,
                stacklevel=5,
            )
            config.heads = {layer: heads for layer, heads in config.heads.items() if layer in wrapped}
