"""What a comparison is asked for: ``restorelcc compare's`` settings, its methods and their standard rates, the
pruning spec, and the files it writes (the settings shared with ``run`` are ``pipeline.settings``); readable without
torch, so that the command line builds its parser here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..pipeline.settings import RecoverySettings
from ..pruning.choices import resolve_sparsity

# 2: compare.json (was results.json); per run the merged model's speed and reload, epochs, seq_len, examples seen;
# failed runs under "failed". 3: per run the unmerged model's forward time (unmerged_forward_seconds,
# unmerged_speed_ratio); a schema-2 file is still read and resumed (its runs get the unmerged time of an untrained
# adapter of the same shape, marked by unmerged_speed_source).
SCHEMA_VERSION = 3


READABLE_SCHEMAS = (2, 3)


RESULTS_FILE = "compare.json"


TABLE_FILE = "compare.md"


PLOT_FILE = "compare.png"


# Why no plot was drawn (``restorelcc compare`` and ``run`` print it): the eval extra brings matplotlib.
PLOT_MISSING = "matplotlib is not installed (pip install matplotlib, or the package's eval extra)"


PRUNING_METHODS = ("magnitude", "wanda", "sparsegpt")


# Each method's standard learning rate (benchmarks/recovery_methods.yaml: the rates its rows train at).
METHODS: dict[str, float] = {"restorelcc": 1e-3, "lora": 5e-4, "dora": 5e-4, "ia3": 1e-3, "masked-lora": 5e-4}


# Settings a run may differ in and still be kept on resume: what is run, not how it is measured.
PLAN_FIELDS = ("methods", "seeds", "device")


@dataclass
class CompareSettings(RecoverySettings):
    """Everything a comparison does differently from the next (``restorelcc compare``'s flags, by name)."""

    pruned: str | None = None  # a pruned model to load; None: prune ``model`` with ``prune``
    pruned_revision: str | None = None
    prune: str = "wanda:0.5"
    methods: Sequence[str] = ("restorelcc", "lora")
    seeds: Sequence[int] = (0,)
    lora_rank: int = 8
    learning_rates: dict[str, float] = field(default_factory=dict)  # per method; the rest keep METHODS' rates
    seq_len: int = 128  # longest training sequence, in tokens

    def learning_rate(self, method: str) -> float:
        return self.learning_rates.get(method, METHODS[method])


def parse_prune(spec: str) -> tuple[str, float | None, str | None]:
    """``wanda:0.5`` -> ``("wanda", 0.5, None)``; ``sparsegpt:2:4`` -> ``("sparsegpt", None, "2:4")``. ValueError
    with one line for an unknown method or a ratio outside (0, 1)."""
    method, _, shape = spec.partition(":")
    if method not in PRUNING_METHODS or not shape:
        raise ValueError(f"--prune {spec!r}: give METHOD:RATIO or METHOD:N:M, METHOD one of {list(PRUNING_METHODS)}")
    if ":" in shape:
        resolve_sparsity(None, shape)  # a malformed N:M pattern fails here
        return method, None, shape
    try:
        ratio = float(shape)
    except ValueError:
        raise ValueError(f"--prune {spec!r}: the ratio must be a number in (0, 1), e.g. {method}:0.5") from None
    if not 0 < ratio < 1:
        raise ValueError(f"--prune {spec!r}: the ratio must be in (0, 1), got {ratio}")
    return method, ratio, None


def parse_methods(text: str) -> list[str]:
    """``restorelcc,lora`` -> the method names, each known and given once (ValueError with one line naming the
    unknown or the repeated method)."""
    methods = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in methods if name not in METHODS]
    if unknown:
        raise ValueError(f"--methods {text!r}: unknown method {unknown[0]!r}: choose from {', '.join(METHODS)}")
    repeated = [name for index, name in enumerate(methods) if name in methods[:index]]
    if repeated:
        raise ValueError(f"--methods {text!r}: {repeated[0]!r} is given twice: give each method once")
    if not methods:
        raise ValueError(f"--methods {text!r}: give one or more of {', '.join(METHODS)}, comma-separated")
    return methods
