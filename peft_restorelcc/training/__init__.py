"""Recovery training: the Trainer set-up, the losses and distillation (``trainer``), the chunked output head
(``logits``)."""

from __future__ import annotations

from .. import lazy_face

# Each name loads its module on first use (see ``lazy_face``).
__getattr__, __all__ = lazy_face(
    __name__,
    {
        ".choices": (
            "DATA_CHOICES",
            "DEFAULT_DATA",
            "PAPER_BATCH_SIZE",
            "PAPER_EPOCHS",
            "PAPER_LEARNING_RATE",
            "PAPER_SAMPLES",
            "TASK_DATA_PREFIX",
        ),
        ".trainer": (
            "CHECKPOINT_MARKER",
            "IGNORE_INDEX",
            "NonFiniteTraining",
            "PaddingCollator",
            "RecoveryTrainer",
            "build_train_dataset",
            "check_data_choice",
            "check_data_source",
            "distillation_kl",
            "instruction_records",
            "is_main_process",
            "labelled_positions",
            "pad_token_id_of",
            "peak_memory_mb",
            "read_jsonl",
            "text_windows",
            "tokenize_chat",
            "tokenize_instruction",
            "train_adapter",
            "warn_if_fsdp_was_not_applied",
        ),
    },
)
