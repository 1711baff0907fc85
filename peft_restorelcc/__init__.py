"""peft_restorelcc: RestoreLCC as a PEFT tuner type.

Importing this package registers the ``RESTORELCC`` method with PEFT: ``peft.PeftType.RESTORELCC`` becomes a member
of PEFT's enum and the method enters PEFT's tables, so ``get_peft_model``, ``PeftModel.from_pretrained`` and
``AutoPeftModelForCausalLM`` know it. An installed package also imports itself right after ``peft`` is imported
(``peft_restorelcc_autoload``), so no import is needed; with ``PEFT_RESTORELCC_AUTOLOAD=0`` import it first.

The tuner itself is ``peft_restorelcc.tuner`` (standalone: torch, transformers and peft only). This package adds the
family-specific merge policy (``export``): a merged model keeps its compensation through ``save_pretrained`` and a
stock ``from_pretrained``.
"""

from __future__ import annotations

import logging as _logging

# bitsandbytes 0.50 (installed for quantized bases) logs a warning at import on CPUs with AVX512-BF16 when it cannot
# fetch an optional kernel from the Hub, and then uses its own: a line of noise in front of every command's output.
# Raised to ERROR here, before peft imports bitsandbytes, unless the user has set that logger's level.
_bnb_cpu_logger = _logging.getLogger("bitsandbytes.backends.cpu.ops")
if _bnb_cpu_logger.level == _logging.NOTSET:
    _bnb_cpu_logger.setLevel(_logging.ERROR)

from . import export, hub  # noqa: E402
from .tuner import (  # noqa: E402
    PEFT_TYPE,
    Linear,
    RestoreLCCConfig,
    RestoreLCCLayer,
    RestoreLCCModel,
    restorelcc_layers,
)
from .tuner import register as _register_with_peft  # noqa: E402

__version__ = "0.1.0"
__all__ = ["hub", "RestoreLCCConfig", "RestoreLCCLayer", "RestoreLCCModel", "Linear", "restorelcc_layers", "PEFT_TYPE"]

# Idempotent (the tuner registered itself on import); kept so a reload of this package re-registers.
_register_with_peft()
export.install_merge_policy()
