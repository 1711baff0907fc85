"""Pruning of decoder-only LLMs: magnitude, Wanda, SparseGPT (unstructured or N:M) and uniform structured pruning.

Conventions

* Only the projections inside the decoder blocks are pruned (``nn.Linear`` and transformers' ``Conv1D``, whose weight
  is stored ``in x out``). Embeddings, the final norm and ``lm_head`` stay dense.
* Unstructured magnitude and Wanda pruning compare weights within each output row (as the Wanda paper does), so every
  row, and therefore every layer, gets ``round(in_features * sparsity)`` zeros. SparseGPT chooses its mask per block of
  128 input columns over all rows (the paper's adaptive mask selection), with the count per block chosen so that the
  whole layer lands on ``round(rows * cols * sparsity)`` zeros.
* ``N:M`` has the meaning of the Wanda and SparseGPT papers: at most ``N`` non-zeros in every group of ``M``
  consecutive input weights of a row, so the pattern implies ``sparsity = 1 - N / M`` ("2:4" and "4:8" are 50%).
  ``sparsity`` may then be omitted (``None``); a value that disagrees with the pattern is rejected.
* Wanda and SparseGPT run layer by layer: the calibration batch goes through the blocks one at a time, the inputs of
  every projection of a block are gathered with forward hooks, the block is pruned, and the block's outputs are then
  recomputed with the pruned weights to become the next block's inputs.
* Everything is validated before the model is touched: a ValueError leaves the model as it was.
* Models dispatched by accelerate (``device_map``: blocks on several devices, or offloaded to CPU RAM or disk) are
  pruned block by block on each block's execution device; offloaded weights are written back to accelerate's
  weights map (never to the checkpoint on disk).

Layout: one module per pruner (``magnitude``, ``wanda``, ``sparsegpt``, ``structured``), ``common`` (validation,
blocks, masks, sparsity, accelerate-aware weight access), ``sequential`` (the layer-by-layer driver and
``prune_model``) and ``reports`` (reports, calibration windows, saving). The names below are the public API.
"""

from __future__ import annotations

from .. import lazy_face

# Each name loads its module on first use (see ``lazy_face``).
__getattr__, __all__ = lazy_face(
    __name__,
    {
        ".choices": ("METHODS", "parse_pattern", "resolve_sparsity"),
        ".common": (
            "REPORT_FILE",
            "_all_projections",
            "check_nm_pattern",
            "find_decoder_layers",
            "hold_pruned_weights_at_zero",
            "measure_sparsity",
            "read_weight",
        ),
        ".magnitude": ("magnitude_prune_weight",),
        ".reports": ("calibration_windows", "load_report", "normalise_report_keys", "save_pruned", "summary_rows"),
        ".sequential": ("_InputStatistics", "prune_model"),
        ".sparsegpt": ("SPARSEGPT_BLOCK_SIZE", "SPARSEGPT_DAMPENING", "sparsegpt_prune_weight"),
        ".structured": ("STRUCTURED_MODEL_TYPES", "structured_prune_heads"),
        ".wanda": ("wanda_prune_weight",),
    },
)
