"""The lost components of every head of a pruned model, and what identifies that pruned model.

All per-head tensors are stacked over the heads of the PRUNED model in (layer, head) order, so scoring and
selection are single tensor ops; ``layer_indices`` / ``heads_per_layer`` say where each layer's rows are.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..tuner.heads import find_head_projections, is_quantized_projection, projection_weight

FORMAT_VERSION = 1
TENSORS_FILE = "lost_components.safetensors"
METADATA_FILE = "lost_components.json"
# The paper's "main component": the projection of mean(X) on the top-10 lost directions.
MAIN_COMPONENTS_K = 10
# Entries sampled per projection for the fingerprint: enough to tell two pruning masks apart.
_FINGERPRINT_SAMPLES = 32


@dataclass
class LostComponents:
    """Per head of the pruned model: lost directions, their singular values, the mean lost vector, scores.

    ``basis[h]`` is ``d x d``: rows are the right singular vectors of the head's lost activations
    ``X = a_dense - a_pruned`` (unit rows, sorted by decreasing singular value). ``output_metric[h]`` is
    ``W_h^T W_h`` for the head's slice ``W_h`` of the pruned output projection, so the size of a lost vector as
    the layer sees it, ``||W_h x||``, is computable without the model.
    """

    layer_indices: list[int]
    heads_per_layer: list[int]
    head_dim: int
    basis: torch.Tensor
    singular_values: torch.Tensor
    mean: torch.Tensor
    output_metric: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    # Secondary ranking key (lower is better), e.g. the probe's validation loss; breaks ties in ``scores``.
    tie_break: torch.Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        total = sum(self.heads_per_layer)
        d = self.head_dim
        if len(self.layer_indices) != len(self.heads_per_layer):
            raise ValueError("layer_indices and heads_per_layer must have the same length.")
        expected = {
            "basis": (total, d, d),
            "singular_values": (total, d),
            "mean": (total, d),
            "output_metric": (total, d, d),
            "scores": (total,),
            "tie_break": (total,),
        }
        for name, shape in expected.items():
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"LostComponents.{name} has shape {tuple(value.shape)}, expected {shape}.")

    # ----------------------------------------------------------------------------------------------- layout
    @property
    def num_heads(self) -> int:
        """Total number of heads (rows) over all layers."""
        return sum(self.heads_per_layer)

    @property
    def offsets(self) -> dict[int, int]:
        """First row of each layer."""
        offsets, start = {}, 0
        for layer, count in zip(self.layer_indices, self.heads_per_layer):
            offsets[layer] = start
            start += count
        return offsets

    def head_ids(self) -> list[tuple[int, int]]:
        """``(layer, head)`` of every row."""
        return [(layer, h) for layer, count in zip(self.layer_indices, self.heads_per_layer) for h in range(count)]

    def rows_of(self, layer: int, heads: list[int]) -> torch.Tensor:
        """Row indices of ``heads`` of ``layer`` (pruned-model head numbering)."""
        offsets = self.offsets
        if layer not in offsets:
            raise ValueError(f"Layer {layer} has no lost components (layers: {self.layer_indices}).")
        count = self.heads_per_layer[self.layer_indices.index(layer)]
        bad = [h for h in heads if not 0 <= h < count]
        if bad:
            raise ValueError(f"Layer {layer} has {count} heads; head indices {bad} are out of range.")
        return torch.tensor([offsets[layer] + h for h in heads], dtype=torch.long)

    # ----------------------------------------------------------------------------------------- derived values
    def lost_coefficients(self, k: int | None = None) -> torch.Tensor:
        """Coefficients of the mean lost vector in the first ``k`` basis rows: ``(heads, k)``."""
        k = self.head_dim if k is None else k
        return torch.einsum("hkd,hd->hk", self.basis[:, :k], self.mean)

    def main_components(self, k: int = MAIN_COMPONENTS_K) -> torch.Tensor:
        """The paper's main component per head: mean(X) projected on its top-``k`` lost directions, ``(heads, d)``.

        ``sum_i mean(U[:, i]) S_i V_i`` equals ``sum_i (mean(X) . V_i) V_i`` because ``X V_i = S_i U[:, i]``.
        """
        k = min(k, self.head_dim)
        return torch.einsum("hk,hkd->hd", self.lost_coefficients(k), self.basis[:, :k])

    def lost_norms(self, reduction: str = "mean") -> torch.Tensor:
        """Size of the lost output per head as the layer sees it, ``(heads,)``.

        ``"mean"``: ``||W_h mean(X)||``, what a constant correction can restore. ``"rms"``:
        ``sqrt(mean_n ||W_h x_n||^2) = sqrt(sum_i S_i^2 v_i^T W_h^T W_h v_i / n)``. Without ``output_metric`` the
        head's own norm is used (``W_h`` = identity).
        """
        metric = self.output_metric
        if metric is None:
            metric = torch.eye(self.head_dim).expand(self.num_heads, -1, -1)
        metric = metric.double()
        if reduction == "mean":
            mean = self.mean.double()
            return torch.einsum("hd,hde,he->h", mean, metric, mean).clamp_min(0).sqrt().float()
        if reduction == "rms":
            basis = self.basis.double()
            per_direction = torch.einsum("hkd,hde,hke->hk", basis, metric, basis)
            count = max(int(self.metadata.get("num_positions") or 1), 1)
            energy = (per_direction * self.singular_values.double() ** 2).sum(-1) / count
            return energy.clamp_min(0).sqrt().float()
        raise ValueError(f"Unknown lost-norm reduction {reduction!r}; use 'mean' or 'rms'.")

    def ranking(self) -> torch.Tensor:
        """Row indices from best to worst score; ties broken by ``tie_break`` (lower first), then row order."""
        if self.scores is None:
            raise ValueError("These lost components have no head scores yet: call score_heads(...) first.")
        order = torch.arange(self.num_heads)
        if self.tie_break is not None:
            order = torch.argsort(self.tie_break[order], stable=True)
        return order[torch.argsort(self.scores[order], descending=True, stable=True)]

    def with_scores(self, scores: torch.Tensor, strategy: str, tie_break: torch.Tensor | None = None) -> LostComponents:
        """A copy carrying ``scores`` (tensors other than the scores are shared)."""
        scored = copy.copy(self)
        scored.scores = scores.detach().float().cpu()
        scored.tie_break = None if tie_break is None else tie_break.detach().float().cpu()
        scored.metadata = {**self.metadata, "score_strategy": strategy}
        scored.__post_init__()
        return scored

    # ------------------------------------------------------------------------------------------- identity
    def check_matches(self, pruned_model: nn.Module) -> None:
        """Raise a ValueError unless ``pruned_model`` is the pruned model these components were measured on."""
        expected = self.metadata.get("fingerprint")
        if expected is None:
            raise ValueError("These lost components carry no fingerprint of their pruned model; recalibrate.")
        target_modules = self.metadata.get("target_modules")
        actual = model_fingerprint(pruned_model, target_modules=target_modules, head_dim=self.head_dim)
        problem = compare_fingerprints(expected, actual)
        if problem is not None:
            raise ValueError(
                f"These lost components were measured on another pruned model "
                f"({self.metadata.get('pruned_model') or 'unnamed'}, fingerprint {expected.get('digest')}; "
                f"this model: {actual.get('digest')}): {problem}. Calibrate this pruned model instead."
            )

    # ------------------------------------------------------------------------------------------- storage
    def save(self, directory: str | os.PathLike) -> None:
        """Write ``lost_components.safetensors`` and ``lost_components.json`` into ``directory``."""
        os.makedirs(directory, exist_ok=True)
        tensors = {"basis": self.basis, "singular_values": self.singular_values, "mean": self.mean}
        for name in ("output_metric", "scores", "tie_break"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name)
        save_file(
            {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()},
            os.path.join(directory, TENSORS_FILE),
        )
        document = {
            "format_version": FORMAT_VERSION,
            "layer_indices": list(self.layer_indices),
            "heads_per_layer": list(self.heads_per_layer),
            "head_dim": self.head_dim,
            "metadata": self.metadata,
        }
        with open(os.path.join(directory, METADATA_FILE), "w") as handle:
            json.dump(document, handle, indent=2, sort_keys=True)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> LostComponents:
        """Read components written by :meth:`save`."""
        meta_path = os.path.join(directory, METADATA_FILE)
        if not os.path.isfile(meta_path):
            raise ValueError(f"No {METADATA_FILE} in {directory}: not a lost-components directory.")
        with open(meta_path) as handle:
            document = json.load(handle)
        if document.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: unsupported format_version {document.get('format_version')!r}.")
        tensors = load_file(os.path.join(directory, TENSORS_FILE))
        metadata = document["metadata"]
        if metadata.get("kept_heads") is not None:
            metadata["kept_heads"] = normalize_kept_heads(metadata["kept_heads"])
        return cls(
            layer_indices=[int(i) for i in document["layer_indices"]],
            heads_per_layer=[int(i) for i in document["heads_per_layer"]],
            head_dim=int(document["head_dim"]),
            basis=tensors["basis"],
            singular_values=tensors["singular_values"],
            mean=tensors["mean"],
            output_metric=tensors.get("output_metric"),
            scores=tensors.get("scores"),
            tie_break=tensors.get("tie_break"),
            metadata=metadata,
        )

    def summary(self) -> str:
        meta = self.metadata
        scored = f", scored by {meta.get('score_strategy')}" if self.scores is not None else ""
        return (
            f"LostComponents: {self.num_heads} heads in {len(self.layer_indices)} layers, head_dim {self.head_dim}, "
            f"{meta.get('num_samples')} samples ({meta.get('position')} position), pruned model "
            f"{meta.get('pruned_model') or 'unnamed'} [{(meta.get('fingerprint') or {}).get('digest')}]{scored}"
        )


def read_projection_weight(module: nn.Module) -> torch.Tensor | None:
    """The ``out x in`` weight of a projection (under any tuner wrapper), also when accelerate offloaded it: then
    it is read from the offload hook's weights map. ``None`` when it cannot be read (also a quantized projection,
    whose weight is packed data: fingerprints then compare shapes only, as for an offloaded one)."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if is_quantized_projection(base):
        return None
    weight = projection_weight(base).detach()
    if weight.device.type != "meta":
        return weight
    hook = getattr(base, "_hf_hook", None)
    for candidate in [hook, *getattr(hook, "hooks", [])]:
        weights_map = getattr(candidate, "weights_map", None)
        if weights_map is not None and "weight" in weights_map:
            stored = weights_map["weight"]
            return stored if isinstance(base, nn.Linear) else stored.t()
    return None


def normalize_kept_heads(kept_heads: dict | None) -> dict[int, list[int]] | None:
    """``{layer: [dense head indices]}`` with integer keys (JSON turns them into strings)."""
    if kept_heads is None:
        return None
    return {int(layer): [int(h) for h in heads] for layer, heads in kept_heads.items()}


# --------------------------------------------------------------------------------------------- fingerprint
def model_fingerprint(
    model: nn.Module, target_modules: str | list[str] | None = None, head_dim: int | None = None
) -> dict[str, Any]:
    """A summary of the attention output projection weights that tells pruned models apart.

    Per projection: its shape, the fraction of exact zeros (the pruning mask), the mean absolute value and a few
    entries at fixed positions. Compared with tolerances (see :func:`compare_fingerprints`), so the same pruned
    model loaded in bf16 or on another device still matches, while another mask or sparsity does not.
    """
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    projections = find_head_projections(model, target_modules=target_modules, head_dim=head_dim)
    modules = dict(model.named_modules())
    entries = []
    for projection in projections:
        weight = read_projection_weight(modules[projection.name])
        if weight is None:  # offloaded where it cannot be read: only the shape can be compared
            entries.append({"shape": [projection.out_features, projection.in_features], "offloaded": True})
            continue
        flat = weight.reshape(-1)
        generator = torch.Generator().manual_seed(flat.numel())
        positions = torch.randint(0, flat.numel(), (_FINGERPRINT_SAMPLES,), generator=generator)
        entries.append(
            {
                "shape": list(weight.shape),
                "zero_fraction": 1.0 - int(torch.count_nonzero(flat)) / flat.numel(),
                "abs_mean": float(flat.abs().sum(dtype=torch.float64)) / flat.numel(),
                "samples": [float(v) for v in flat[positions.to(flat.device)].double().cpu()],
            }
        )
    rounded = json.dumps(
        [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in e.items() if k != "samples"} for e in entries],
        sort_keys=True,
    )
    return {"projections": entries, "digest": hashlib.sha256(rounded.encode()).hexdigest()[:16]}


def compare_fingerprints(expected: dict[str, Any], actual: dict[str, Any]) -> str | None:
    """``None`` when the fingerprints describe the same weights (up to a bf16 round trip), else the difference."""
    exp, act = expected.get("projections", []), actual.get("projections", [])
    if len(exp) != len(act):
        return f"{len(exp)} attention output projections expected, found {len(act)}"
    for i, (e, a) in enumerate(zip(exp, act)):
        if e["shape"] != a["shape"]:
            return f"projection {i}: shape {a['shape']} instead of {e['shape']}"
        if e.get("offloaded") or a.get("offloaded"):
            continue
        if abs(e["zero_fraction"] - a["zero_fraction"]) > 1e-3:
            return (
                f"projection {i}: {a['zero_fraction']:.4f} of its weights are zero instead of {e['zero_fraction']:.4f}"
            )
        if abs(e["abs_mean"] - a["abs_mean"]) > 1e-2 * max(e["abs_mean"], 1e-12):
            return f"projection {i}: mean |weight| {a['abs_mean']:.6g} instead of {e['abs_mean']:.6g}"
        tolerance = 1e-2 * max(e["abs_mean"], 1e-12)
        for x, y in zip(e["samples"], a["samples"]):
            if (x == 0) != (y == 0) or abs(x - y) > tolerance + 1e-2 * abs(x):
                return f"projection {i}: sampled weights differ"
    return None
