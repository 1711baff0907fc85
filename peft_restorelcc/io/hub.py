"""Hub ids: recognising them and fetching a snapshot into the user's own Hugging Face cache.

Downloads go through ``huggingface_hub.snapshot_download`` exactly as a user's ``from_pretrained`` would, so the
user's ``HF_HUB_OFFLINE``, ``HF_HOME`` / ``HF_HUB_CACHE``, token and endpoint all apply; nothing here sets or reads
them itself. Every failure becomes one ``ValueError`` line (the CLI prints it and exits 2).
"""

from __future__ import annotations

from pathlib import Path

# What a causal LM needs from a model repository: configs, safetensors weights, tokenizer files. Other formats in
# the same repository (GGUF, ONNX, a second copy in .bin) are not downloaded.
MODEL_PATTERNS: tuple[str, ...] = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja")
# Old repositories without safetensors: their PyTorch weights, fetched only when no safetensors file came.
LEGACY_WEIGHT_PATTERNS: tuple[str, ...] = ("*.bin",)
# from_pretrained reads the top level of a model repository only: sub-folders (onnx/, original/, other checkpoints)
# are left on the Hub.
SUBFOLDERS = "*/*"


def is_hub_id(text: str) -> bool:
    """``org/name`` that the Hub accepts as a repository id. A bare ``name`` is not taken as one: a mistyped
    embedded name or folder should fail here, not turn into a download."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if text.count("/") != 1 or text.startswith((".", "~")):
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _offline() -> bool:
    # Read from huggingface_hub's own constants: the user's setting as the library itself sees it.
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _error_line(repo_id: str, revision: str | None, error: Exception) -> str:
    """One line saying what went wrong with ``repo_id`` at ``revision`` and what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {revision!r}" if revision else ""
    if isinstance(error, RevisionNotFoundError):
        return f"{repo_id}: no revision {revision!r} on the Hub (pass a branch, tag or commit sha that exists)."
    if isinstance(error, GatedRepoError):
        return f"{repo_id} is gated: accept its terms on the Hub and log in (hf auth login, or set HF_TOKEN)."
    if isinstance(error, RepositoryNotFoundError):
        return (
            f"{repo_id}: no such model on the Hub, or it is private (log in with hf auth login, or set HF_TOKEN); "
            "a local directory must exist."
        )
    if isinstance(error, LocalEntryNotFoundError):
        if _offline():
            return f"{repo_id}{at} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: nothing can be fetched."
        return f"{repo_id}{at}: the Hub could not be reached and the model is not in the Hugging Face cache."
    return f"{repo_id}{at}: the Hub download failed ({type(error).__name__}: {str(error).splitlines()[0]})."


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def download_snapshot(repo_id: str, revision: str | None = None, patterns: tuple[str, ...] | None = None) -> Path:
    """The local folder of ``repo_id`` at ``revision`` (default branch when None) in the user's Hugging Face cache,
    downloading what is missing. ``patterns`` limits the files (None: all). Raises ValueError with one line."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    model = patterns == MODEL_PATTERNS
    ignore = SUBFOLDERS if model else None
    try:
        allow = list(patterns) if patterns else None
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=allow, ignore_patterns=ignore))
        if model and not _has_weights(folder):
            legacy = list(LEGACY_WEIGHT_PATTERNS)
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=legacy, ignore_patterns=ignore))
    except (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OSError, ValueError) as error:
        raise ValueError(_error_line(repo_id, revision, error)) from None
    return folder
