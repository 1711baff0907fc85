"""Calibration: measure what pruning took from each attention head, score the heads, build the adapter.

components = calibrate(dense, pruned, prompts, tokenizer, pairs=pairs, strategy="probe")
components.save("out/lost_components")
peft_model = build_restorelcc_model(pruned, components, num_heads=0.1, init="lost")
"""

from __future__ import annotations

from .. import lazy_face

# Each name loads its module on first use (see ``lazy_face``).
__getattr__, __all__ = lazy_face(
    __name__,
    {
        "..data.pairs": ("pairs_from_answers", "pairs_from_choices"),
        "..io.models": ("ModelLoader",),
        ".adapter": ("SELECTIONS", "build_restorelcc_model", "refine_lost_init", "resolve_head_count", "select_heads"),
        ".capture": (
            "HeadCapture",
            "LostAccumulator",
            "capture_activations",
            "last_token_positions",
            "make_batches",
            "probe_activations",
            "tokenize",
        ),
        ".choices": ("NEGATIVES", "PAPER_PAIRS", "PAPER_PROMPTS"),
        ".components": ("LostComponents", "compare_fingerprints", "model_fingerprint"),
        ".inputs": ("CalibrationInputs", "calibration_inputs", "resolve_negatives"),
        ".measure": ("calibrate",),
        ".scoring": ("probe_scores", "random_scores", "score_heads"),
    },
)
