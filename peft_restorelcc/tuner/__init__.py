"""The RestoreLCC tuner: config, layer, model and the architecture table, and its registration with PEFT.

This folder imports only torch, transformers, peft and the standard library (tests/test_tuner_isolation.py checks
it), so it could be copied into ``peft/tuners/restorelcc/`` with only the import path changed. Family-specific
merge/export policy lives outside it (``peft_restorelcc.io.merge_policy`` installs it as ``RestoreLCCModel.merge_policy``).
"""

from __future__ import annotations

from .config import PEFT_TYPE, RestoreLCCConfig
from .layer import Linear, RestoreLCCLayer
from .model import MergePolicy, RestoreLCCModel, restorelcc_layers

__all__ = [
    "PEFT_TYPE",
    "Linear",
    "MergePolicy",
    "peft_type_member",
    "RestoreLCCConfig",
    "RestoreLCCLayer",
    "RestoreLCCModel",
    "register",
    "restorelcc_layers",
]


def peft_type_member(name: str = PEFT_TYPE):
    """``peft.PeftType.<name>``, added to PEFT's closed str-enum on first call and reused afterwards (RESTORELCC here;
    the package's masked LoRA adds MASKED_LORA the same way).

    PEFT reads ``config.peft_type.value``, calls ``PeftType(name)`` and iterates ``list(PeftType)``, so the type
    must be a real member, built the way ``enum`` builds one (a str instance with name, value and sort order).
    Inside PEFT itself this would be a plain enum member and this function would go.
    """
    from peft.utils.peft_types import PeftType

    existing = PeftType._member_map_.get(name)
    if existing is not None:
        return existing
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    # type.__setattr__: EnumType's own __setattr__ refuses to touch members.
    type.__setattr__(PeftType, name, member)
    PeftType._member_names_.append(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    return member


def register() -> None:
    """Make RESTORELCC a PEFT method: a ``PeftType`` member, then PEFT's own ``register_peft_method``.

    Idempotent, so a second import, ``importlib.reload`` or a registration hook running it again all work: the
    enum member is reused, and entries of an earlier registration are dropped first because
    ``register_peft_method`` refuses a name twice (a reload brings new classes that must replace the old ones).
    Not mixed-compatible: PEFT's ``PeftMixedModel`` dispatches on a hard-coded list of LoRA-like tuners.
    """
    from peft import mapping
    from peft.utils import register_peft_method

    peft_type = peft_type_member()
    for table in (
        mapping.PEFT_TYPE_TO_CONFIG_MAPPING,
        mapping.PEFT_TYPE_TO_TUNER_MAPPING,
        mapping.PEFT_TYPE_TO_PREFIX_MAPPING,
        mapping.PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
    ):
        table.pop(peft_type, None)
    register_peft_method(
        name=PEFT_TYPE.lower(), config_cls=RestoreLCCConfig, model_cls=RestoreLCCModel, prefix=RestoreLCCModel.prefix
    )


register()
