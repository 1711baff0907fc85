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

import logging


def _quiet_bitsandbytes_kernel_fetch(record: logging.LogRecord) -> bool:
    # bitsandbytes >= 0.50 on CPUs with AVX512-BF16, when the `kernels` package is installed, tries to fetch a CPU
    # kernel from the Hub as it is imported (by peft, below) and logs this when it cannot (offline, or the repository
    # is not on the remote-code allowlist); it then runs its own kernel. Only that one message is dropped, so every
    # `restorelcc` command's error stays one line.
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_quiet_bitsandbytes_kernel_fetch)

from . import export, hub, masked_lora  # noqa: E402 - masked_lora registers MASKED_LORA with PEFT
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
masked_lora.register()  # idempotent, as above
