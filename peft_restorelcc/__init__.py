"""peft_restorelcc: RestoreLCC as a PEFT tuner type.

Importing this package registers the ``RESTORELCC`` method with PEFT, so ``get_peft_model``,
``PeftModel.from_pretrained`` and ``AutoPeftModelForCausalLM`` know it. Import it before loading an adapter.
"""

from __future__ import annotations

from . import hub
from .config import PEFT_TYPE, RestoreLCCConfig
from .layer import Linear, RestoreLCCLayer
from .model import RestoreLCCModel, restorelcc_layers

__version__ = "0.1.0"
__all__ = ["hub", "RestoreLCCConfig", "RestoreLCCLayer", "RestoreLCCModel", "Linear", "restorelcc_layers", "PEFT_TYPE"]


def _register_with_peft() -> None:
    """Fill PEFT's method tables. Idempotent: a second import, or a reload, overwrites the same entries.

    ``peft.utils.register_peft_method`` only accepts members of PEFT's closed ``PeftType`` enum, and refuses a
    second registration. ``PeftType`` is a str-enum, so the plain string key compares equal wherever PEFT looks a
    type up, and writing the tables directly needs neither.
    """
    from peft import mapping

    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = RestoreLCCConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = RestoreLCCModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = RestoreLCCModel.prefix
    mapping.PEFT_TYPE_TO_MIXED_MODEL_MAPPING[PEFT_TYPE] = RestoreLCCModel


_register_with_peft()
