"""Writing an output directory all at once: a failure never leaves a half-written one."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def check_new_output_dir(output_dir: str | os.PathLike, label: str = "Output directory", hint: str = "") -> Path:
    """The resolved path if it is absent or an empty directory; otherwise a ValueError that says what to do.

    The one output-directory check of the package (library writers and every CLI subcommand): ``label`` names what
    the user passed (a CLI flag such as ``--output``), ``hint`` is appended to the advice.
    """
    output = Path(output_dir).expanduser().resolve()
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ValueError(
            f"{label} {output} exists and is not an empty directory (a file, or a folder that is not empty): pass a "
            f"new or empty directory{hint or ', or remove it'}."
        )
    return output


@contextmanager
def staged_output_dir(output_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``output_dir`` to write into; on success it is renamed to ``output_dir``, on
    any failure it is removed. ``output_dir`` must be new or empty (checked first)."""
    output = check_new_output_dir(output_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        yield staging
        if output.is_dir():
            output.rmdir()  # empty (checked above): a rename cannot replace a directory on every platform
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
