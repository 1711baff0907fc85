"""The settings of the two whole jobs: what ``restorelcc run`` and ``restorelcc compare`` share
(``RecoverySettings``), and ``run``'s own (``RunSettings``); readable without torch, so that the command line checks
its flags here. ``compare.settings.CompareSettings`` adds the comparison's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..training.choices import DEFAULT_DATA


@dataclass
class RecoverySettings:
    """What a recovery does, from the model to the evaluation, whether it is one run or a comparison of methods (the
    flags of ``run`` and ``compare``, by name)."""

    model: str = "smollm2-135m"
    revision: str | None = None
    prune_samples: int = 64
    calibration_samples: int = 128
    num_pairs: int = 256
    heads: float = 0.25
    data: str = DEFAULT_DATA
    train_steps: int | None = 200  # optimizer steps; None with ``epochs``
    epochs: float | None = None  # train by epochs over ``train_samples`` examples instead of by steps
    train_samples: int | None = None  # the training set's size; None: train_steps x batch_size (each seen once)
    batch_size: int = 8
    tasks: Sequence[str] | None = None
    include_path: str | None = None  # a folder of the user's own lm-eval task YAMLs
    limit: int | None = 100
    perplexity_passages: int = 64
    eval_batch_size: int | str = "auto"
    device: str | None = None
    dtype: str = "auto"


@dataclass
class RunSettings(RecoverySettings):
    """Everything ``restorelcc run`` does differently from one call to the next (its flags, by name)."""

    train_samples: int = 2000
    epochs: float = 3.0
    method: str = "wanda"
    sparsity: float = 0.5
    pattern: str | None = None
    strategy: str = "probe"
    selection: str = "top"
    init: str = "paper"
    lr: float = 1e-3
    distill_alpha: float = 0.0
    seed: int = 0
    # A bitsandbytes format (io.QUANTIZATIONS): the pruned model is saved, reloaded quantized, evaluated as such,
    # and the adapter trained on it and merged into it (QLoRA-style); None: everything in dtype.
    quantization: str | None = None
