"""Calibration: measure what pruning took from each attention head, score the heads, build the adapter.

components = calibrate(dense, pruned, prompts, tokenizer, pairs=pairs, strategy="probe")
components.save("out/lost_components")
peft_model = build_restorelcc_model(pruned, components, num_heads=0.1, init="lost")
"""

from .adapter import SELECTIONS, build_restorelcc_model, refine_lost_init, resolve_head_count, select_heads
from .capture import (
    HeadCapture,
    LostAccumulator,
    ModelLoader,
    capture_activations,
    last_token_positions,
    make_batches,
    probe_activations,
    tokenize,
)
from .components import LostComponents, compare_fingerprints, model_fingerprint
from .inputs import NEGATIVES, PAPER_PAIRS, PAPER_PROMPTS, CalibrationInputs, calibration_inputs, resolve_negatives
from .pipeline import calibrate
from .scoring import pairs_from_answers, pairs_from_choices, probe_scores, random_scores, score_heads

__all__ = [
    "NEGATIVES",
    "PAPER_PAIRS",
    "PAPER_PROMPTS",
    "SELECTIONS",
    "CalibrationInputs",
    "HeadCapture",
    "LostAccumulator",
    "LostComponents",
    "ModelLoader",
    "build_restorelcc_model",
    "calibrate",
    "calibration_inputs",
    "capture_activations",
    "compare_fingerprints",
    "last_token_positions",
    "make_batches",
    "model_fingerprint",
    "pairs_from_answers",
    "pairs_from_choices",
    "probe_activations",
    "probe_scores",
    "random_scores",
    "refine_lost_init",
    "resolve_head_count",
    "resolve_negatives",
    "score_heads",
    "select_heads",
    "tokenize",
]
