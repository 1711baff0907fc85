"""Compare recovery methods on one pruned model: the settings (``settings``), the runs (``runs``), masked LoRA
(``masked_lora``, a method PEFT lacks), the checks of the merged model (``merged_checks``), the summary, table and
plot (``table``)."""

from __future__ import annotations

from .. import lazy_face

# Each name loads its module on first use (see ``lazy_face``).
__getattr__, __all__ = lazy_face(
    __name__,
    {
        ".runs": ("BUILDERS", "CALIBRATIONS", "MethodSpec", "Models", "compare", "run_method", "standard_spec"),
        ".settings": ("METHODS", "CompareSettings", "parse_methods", "parse_prune"),
        ".table": ("compare_table", "plot_compare", "summarise"),
    },
)
