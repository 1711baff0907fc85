"""How models can be loaded (the quantizations on load), readable without torch: the command line builds its
parsers from here.
"""

from __future__ import annotations

# --quantization choices: bitsandbytes formats a model is loaded in for a QLoRA-style restore.
QUANTIZATIONS = ("int8", "nf4", "fp4", "nf4-double", "fp4-double")
