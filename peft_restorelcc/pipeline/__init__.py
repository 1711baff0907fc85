"""The main job, the one place that strings the stages together: the stages (``stages``), the whole
``restorelcc run`` (``job``) and the settings of ``run`` and ``compare`` (``settings``)."""

from __future__ import annotations

from .. import lazy_face

# Each name loads its module on first use (see ``lazy_face``).
__getattr__, __all__ = lazy_face(
    __name__,
    {
        ".job": ("CHECKPOINTS_DIR", "run_job"),
        ".settings": ("RecoverySettings", "RunSettings"),
        ".stages": (
            "build_adapter",
            "calibrate",
            "calibrate_components",
            "calibration_inputs",
            "evaluate",
            "evaluate_model",
            "export",
            "load",
            "prune",
            "prune_copy",
            "pruning_metadata",
            "train",
            "training_data",
        ),
    },
)
