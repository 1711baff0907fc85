"""RestoreLCCConfig: which heads of which attention output projections get a lost-component compensation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from peft.config import PeftConfig
from peft.utils.peft_types import PeftType

PEFT_TYPE = "RESTORELCC"
# The string values init_weights takes besides True/False (PEFT's LoRA takes strings the same way).
INIT_WEIGHTS_STRINGS = ("gaussian",)


def normalize_heads(heads: Mapping | None) -> dict[int, list[int]] | None:
    """``{layer: [heads]}`` with int keys, sorted unique int heads; ``None`` for "every head".

    JSON turns integer keys into strings, so a config read back from ``adapter_config.json`` comes through here.
    """
    if heads is None or (isinstance(heads, Mapping) and len(heads) == 0):
        return None
    if not isinstance(heads, Mapping):
        raise ValueError(
            f"heads must be a mapping {{layer_index: [head_index, ...]}}, got {type(heads).__name__}. "
            "Example: heads={0: [1, 3], 5: [0]}."
        )
    normalized: dict[int, list[int]] = {}
    for layer, layer_heads in heads.items():
        try:
            layer_index = _index(layer)
            if isinstance(layer_heads, (str, bytes, Mapping)):
                raise TypeError(layer_heads)
            listed = [_index(head) for head in layer_heads]
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"heads[{layer!r}] = {layer_heads!r} is not a list of integer head indices under an integer layer "
                "index. Example: heads={0: [1, 3]}."
            ) from error
        if layer_index < 0:
            raise ValueError(f"heads has a negative layer index {layer_index}; layer indices count from 0.")
        if layer_index in normalized:
            raise ValueError(f"heads names layer {layer_index} twice ({layer!r}); list each layer once.")
        negative = [head for head in listed if head < 0]
        if negative:
            raise ValueError(f"heads[{layer_index}] has negative head indices {negative}; head indices count from 0.")
        if not listed:
            raise ValueError(
                f"heads[{layer_index}] is empty: list the heads to compensate in layer {layer_index}, or leave the "
                "layer out (heads=None compensates every head)."
            )
        duplicates = sorted({head for head in listed if listed.count(head) > 1})
        if duplicates:
            raise ValueError(f"heads[{layer_index}] lists heads {duplicates} more than once; list each head once.")
        normalized[layer_index] = sorted(listed)
    return dict(sorted(normalized.items())) or None


def _index(value: object) -> int:
    """An integer index (an int, an integral float, or a string of digits as JSON keys are); never a bool."""
    if isinstance(value, bool):
        raise TypeError(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(value)
        return int(value)
    if isinstance(value, str):
        return int(value.strip())
    return int(value.__index__())


@dataclass
class RestoreLCCConfig(PeftConfig):
    """Configuration of a [`RestoreLCCModel`].

    Each selected head ``h`` of a target projection gets ``V_h^T m_h + b_h`` added to its slice of the projection's
    input: ``V_h`` (k x head_dim) is a fixed basis of the directions pruning removed from that head (identity rows
    until calibration fills it, saved with the adapter), ``m_h`` (k) and ``b_h`` (head_dim) are trained. The added
    vector does not depend on the input, so merging folds it into the projection's bias and keeps the weights (and
    their sparsity) untouched.

    Args:
        heads: ``{layer_index: [head_index, ...]}``: the heads to compensate. ``None`` or empty means every head of
            every targeted layer. Integer keys come back from JSON as strings and are normalised.
        target_modules: the attention output projections; defaults by architecture (``self_attn.o_proj`` for the
            Llama family, ``attention.dense`` for GPT-NeoX, ``self_attn.out_proj`` for OPT, ``attn.c_proj`` for
            GPT-2, ...).
        num_components: lost directions per head, k (default: all, k = head_dim). A smaller k stores a smaller basis.
        init_std: standard deviation of the ``init_weights="gaussian"`` initialisation of m and b (the paper: 1e-3).
        use_components: learn magnitudes m over the basis (the paper's ``V^T m`` term).
        use_bias: learn a free per-head bias b. With ``use_components=False`` the adapter is a plain per-head bias.
        head_dim: width of one head's slice; read from the model config when unset and then recorded here, so a
            saved adapter refuses a base with another head_dim.
        num_heads: heads per target projection, for models without a transformers config (plain ``nn.Module``s):
            head_dim = the widest target's input width / num_heads. Transformers models need neither this nor
            head_dim: both come from their config.
        num_layers: number of target projections in the model it was made for; recorded on injection.
        heads_per_layer: heads of each of those projections, in order; recorded on injection, so that a saved
            adapter refuses a base with the same head_dim but another number of heads.
        init_weights: as in PEFT's other methods, ``True`` (default) starts m and b at zero, so the wrapped model's
            output is unchanged (they enter linearly, so training starts fine from there); ``False`` draws them from
            N(0, 1), a random non-identity adapter for tests; ``"gaussian"`` draws them from N(0, init_std), the
            paper's initialisation. Adapters saved before 0.2 with ``true`` meant N(0, init_std); their saved
            weights override the initialisation on load, so they load unchanged.
        layers_to_transform / layers_pattern: restrict the targeted layers as in other PEFT methods. With explicit
            ``heads`` the two are intersected: heads in other layers are dropped with a warning.
        exclude_modules: modules not to wrap even if they match ``target_modules``, as in LoRA (heads in their
            layers are dropped with a warning).
        modules_to_save: extra modules to train and save in full.
        base_model_fingerprint: the ``weights_fingerprint`` of the model the adapter was calibrated and trained on,
            recorded by ``restorelcc calibrate`` / ``train``: a base with other weights (another pruning, the dense
            model) is warned about once on load.
    """

    heads: dict[int, list[int]] | None = field(
        default=None, metadata={"help": "{layer_index: [head_index, ...]}; None or empty means every head."}
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Attention output projections to wrap; defaults by architecture (e.g. self_attn.o_proj)."},
    )
    num_components: int | None = field(
        default=None, metadata={"help": "Lost directions per head (k); default head_dim."}
    )
    init_std: float = field(default=1e-3, metadata={"help": "Std of the N(0, init_std) init of m and b."})
    use_components: bool = field(default=True, metadata={"help": "Train magnitudes over the lost-component basis."})
    use_bias: bool = field(default=True, metadata={"help": "Train a free per-head bias."})
    head_dim: int | None = field(default=None, metadata={"help": "Head width; read from the model config if unset."})
    num_heads: int | None = field(
        default=None, metadata={"help": "Heads per target projection, for models without a transformers config."}
    )
    num_layers: int | None = field(default=None, metadata={"help": "Target projections in the base model."})
    heads_per_layer: list[int] | None = field(
        default=None, metadata={"help": "Heads of each target projection in the base model; recorded on injection."}
    )
    init_weights: bool | str = field(
        default=True,
        metadata={
            "help": "True: m = b = 0 (identity); False: N(0, 1) (random, for tests); 'gaussian': N(0, init_std), the "
            "paper's init."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules not to wrap (names, dotted suffixes or a regex), as in LoRA."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only these layer indices are transformed."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer ModuleList, used with layers_to_transform."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules apart from RestoreLCC layers to train and save."}
    )
    base_model_fingerprint: str | None = field(
        default=None,
        metadata={
            "help": "Fingerprint of the weights of the model the adapter was made on (tuner.fingerprint); loading it "
            "onto a base with other weights warns once. None: not recorded (adapters written before 0.2)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        # The enum member once the package has registered it (always, after import); configs saved with the plain
        # string load the same way.
        self.peft_type = PeftType.__members__.get(PEFT_TYPE, PEFT_TYPE)
        self.heads = normalize_heads(self.heads)
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if not (self.use_components or self.use_bias):
            raise ValueError(
                "use_components=False and use_bias=False leaves nothing to train; enable at least one of them."
            )
        if self.num_components is not None and self.num_components < 1:
            raise ValueError(f"num_components must be >= 1 (or None for head_dim), got {self.num_components}.")
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        if self.num_heads is not None and self.num_heads < 1:
            raise ValueError(f"num_heads must be >= 1 (or None: layout from the model), got {self.num_heads}.")
        if self.head_dim is not None and self.head_dim < 1:
            raise ValueError(f"head_dim must be >= 1 (or None to read it from the model), got {self.head_dim}.")
        if self.num_components is not None and self.head_dim is not None and self.num_components > self.head_dim:
            raise ValueError(
                f"num_components={self.num_components} exceeds head_dim={self.head_dim}: a head has at most "
                "head_dim lost directions. Use num_components <= head_dim or None."
            )
        if not isinstance(self.init_weights, bool) and self.init_weights not in INIT_WEIGHTS_STRINGS:
            raise ValueError(
                f"init_weights must be True (identity), False (random) or one of {INIT_WEIGHTS_STRINGS}, got "
                f"{self.init_weights!r}."
            )
        if not (isinstance(self.init_std, (int, float)) and math.isfinite(self.init_std) and self.init_std >= 0):
            raise ValueError(f"init_std must be a finite number >= 0 (the paper: 1e-3), got {self.init_std}.")
        if self.init_weights == "gaussian" and self.init_std == 0:
            raise ValueError(
                "init_weights='gaussian' with init_std=0 draws nothing: use init_std > 0 (the paper: 1e-3), or "
                "init_weights=True for a zero start."
            )

    def to_dict(self) -> dict:
        # JSON object keys are strings anyway; writing them as such keeps the file and the round trip explicit.
        output = super().to_dict()
        if output.get("heads") is not None:
            output["heads"] = {str(layer): list(heads) for layer, heads in output["heads"].items()}
        return output
