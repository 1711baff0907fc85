"""Writing an output directory all at once: a failure never leaves a half-written one."""

from __future__ import annotations

import errno
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
    # The lock file of a writer (``output_lock``) is not content: a live writer is refused by ``check_not_locked``.
    if output.exists() and (not output.is_dir() or any(p.name != LOCK_FILE for p in output.iterdir())):
        raise ValueError(
            f"{label} {output} exists and is not an empty directory (a file, or a folder that is not empty): pass a "
            f"new or empty directory{hint or ', or remove it'}."
        )
    return output


@contextmanager
def staged_output_dir(output_dir: str | os.PathLike, expected_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of ``output_dir`` to write into; on success it is renamed to ``output_dir``, on
    any failure it is removed (SIGTERM too, under ``handle_termination``, as the CLI runs). ``output_dir`` must be
    new or empty (checked first); staging directories left by killed writers into it are removed first.

    A full disk is a ``DiskFullError`` (one line, exit 2 in the CLI) naming ``output_dir``, the bytes free there and
    ``expected_bytes`` (what the output will take, where the caller knows it): raised before anything is written when
    ``expected_bytes`` already exceeds the free space, else when a write fails with ENOSPC or EDQUOT.
    """
    output = check_new_output_dir(output_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(output)
    free = free_bytes(output.parent)
    if expected_bytes is not None and free is not None and expected_bytes > free:
        raise DiskFullError(output, needed=expected_bytes)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}{STAGING_INFIX}{os.getpid()}-", dir=output.parent))
    try:
        yield staging
        try:
            if output.is_dir():
                output.rmdir()  # empty (checked above): a rename cannot replace a directory on every platform
            os.replace(staging, output)
        except OSError as error:  # another writer filled it meanwhile: keep its output, drop ours
            raise ValueError(
                f"{output} was written by another process while this one ran ({error.strerror}): nothing of this run "
                "was kept; pass a new directory."
            ) from None
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if is_disk_full(error) and not isinstance(error, DiskFullError):
            raise DiskFullError(output, needed=expected_bytes) from None
        raise


# ------------------------------------------------------------------------------------------------ a full disk
#
# safetensors reports a full disk as its own SafetensorError (not an OSError) whose text carries the OS message, and
# other writers wrap the OSError: both the errno and the text are looked for along the exception chain.

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded")


def is_disk_full(error: BaseException | None) -> bool:
    """True when ``error``, or an exception it was raised from or while handling, is a full disk or quota."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(error) for text in DISK_FULL_TEXTS):
            return True
        error = error.__cause__ or error.__context__
    return False


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes free to this user on the filesystem of ``path`` (its nearest existing parent); None if unreadable."""
    candidate = Path(path).expanduser().absolute()
    while not candidate.exists() and candidate != candidate.parent:
        candidate = candidate.parent
    try:
        return shutil.disk_usage(candidate).free
    except OSError:
        return None


def tree_bytes(path: str | os.PathLike) -> int:
    """Bytes of the files under ``path`` (what a write of its kind needs)."""
    root = Path(path)
    if root.is_file():
        return root.stat().st_size
    return sum(entry.stat().st_size for entry in root.rglob("*") if entry.is_file()) if root.is_dir() else 0


def state_bytes(model: object) -> int:
    """Bytes of ``model.state_dict()`` as saved: tensors that share storage (tied embeddings) counted once."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():  # type: ignore[attr-defined]
        key = (tensor.data_ptr(), tensor.numel(), str(tensor.dtype))
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


class DiskFullError(ValueError):
    """A write that did not fit: one line naming the target, the bytes needed where known and the bytes free."""

    def __init__(self, target: str | os.PathLike, needed: int | None = None) -> None:
        self.target, self.needed, self.free = Path(target), needed, free_bytes(target)
        free = "unknown" if self.free is None else f"{self.free:,}"
        need = "" if needed is None else f"it needs {needed:,} bytes, "
        super().__init__(
            f"no space left on the device of {self.target} ({need}{free} bytes free there): nothing half-written was "
            "kept; free some space or write to another disk."
        )


# ------------------------------------------------------------------------------------------------ faults and kills
#
# A staging directory is named ``.<target>.partial-<pid>-<random>``: the writer's process id lets the next run into
# the same target tell a directory left by a killed writer (pid gone: removed, with a message) from one that a live
# writer is still filling (left alone).

STAGING_INFIX = ".partial-"
LOCK_FILE = ".restorelcc.lock"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _staging_pid(name: str, target: str) -> int | None:
    prefix = f".{target}{STAGING_INFIX}"
    if not name.startswith(prefix):
        return None
    head = name[len(prefix) :].split("-", 1)[0]
    return int(head) if head.isdigit() else None


def remove_stale_staging(output_dir: str | os.PathLike) -> list[Path]:
    """Remove the staging directories of ``output_dir`` left by writers that no longer run (``kill -9``, a power
    cut), saying so on stderr; returns what was removed. A staging directory of a live writer is left alone."""
    import sys

    output = Path(output_dir).expanduser().resolve()
    removed = []
    if not output.parent.is_dir():
        return removed
    for candidate in output.parent.iterdir():
        pid = _staging_pid(candidate.name, output.name)
        if pid is None or _pid_alive(pid) or not candidate.is_dir():
            continue
        shutil.rmtree(candidate, ignore_errors=True)
        removed.append(candidate)
        print(
            f"restorelcc: removed {candidate}, a staging directory left by an interrupted run (process {pid}) into "
            f"{output}",
            file=sys.stderr,
        )
    return removed


def pid_of_lock(lock: Path) -> int | None:
    try:
        text = lock.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def check_not_locked(output_dir: str | os.PathLike, label: str = "--output") -> None:
    """A ValueError (one line) when a live process holds the lock of ``output_dir``; a stale lock (its process is
    gone) is removed with a message."""
    import sys

    output = Path(output_dir).expanduser()
    lock = output / LOCK_FILE
    if not lock.exists():
        return
    pid = pid_of_lock(lock)
    if pid is not None and _pid_alive(pid):
        raise ValueError(
            f"{label} {output} is in use by another restorelcc process (pid {pid}, lock file {lock}): wait for it to "
            "finish or choose another directory."
        )
    lock.unlink(missing_ok=True)
    print(f"restorelcc: removed the stale lock {lock} of an interrupted run (process {pid})", file=sys.stderr)


@contextmanager
def output_lock(output_dir: str | os.PathLike, label: str = "--output") -> Iterator[Path]:
    """Hold ``output_dir/.restorelcc.lock`` (created atomically, holding this process id) while writing into
    ``output_dir``: a second writer fails at once with one line. Removed on any exit, SIGTERM/SIGINT included
    (``handle_termination``); a lock left by ``kill -9`` is stale and removed by the next run."""
    output = Path(output_dir).expanduser()
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    lock = output / LOCK_FILE
    check_not_locked(output, label)
    try:
        descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        check_not_locked(output, label)  # raises for the live writer that got in first
        descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(str(os.getpid()))
    try:
        yield lock
    finally:
        if pid_of_lock(lock) == os.getpid():
            lock.unlink(missing_ok=True)
        if created and output.is_dir() and not any(output.iterdir()):
            output.rmdir()  # a run that failed before writing anything leaves no trace


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM, so that ``finally`` blocks and staging clean-ups run."""


@contextmanager
def handle_termination() -> Iterator[None]:
    """Turn SIGTERM into an exception (``Terminated``, exit status 143) for the duration, so that every staging
    directory and lock is removed as for Ctrl-C (SIGINT raises KeyboardInterrupt already). A no-op outside the main
    thread."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):  # noqa: ARG001
        raise Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
