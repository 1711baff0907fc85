"""A full disk, for real: a size-limited tmpfs mounted by the test (as root; skipped elsewhere, with the reason).

Every writer turns ENOSPC into exit 2 with one line naming the target, the bytes needed where known and the bytes
free, and leaves nothing half-written (issue 47, item 2)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_cli_train import save_adapter, save_model, write_jsonl
from test_model import prune_half
from tiny_models import make_tiny_model

from peft_restorelcc.cli import main as cli_main
from peft_restorelcc.io.files import DiskFullError, free_bytes, is_disk_full, staged_output_dir
from peft_restorelcc.training.trainer import CHECKPOINT_MARKER

PAGE = 4096


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs at ``tmp_path/disk``, with ``fill(free)`` to leave about ``free`` bytes on it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True,
                          text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")

    def fill(free: int) -> None:
        filler = mount / "filler"
        filler.unlink(missing_ok=True)
        filler.write_bytes(b"\0" * max(0, free_bytes(mount) - free))

    try:
        yield mount, fill
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def on_disk(path: Path) -> int:
    """Bytes a directory's files take on a filesystem of 4 KiB pages."""
    return sum(-(-entry.stat().st_size // PAGE) * PAGE for entry in path.rglob("*") if entry.is_file())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("disk-full-inputs")
    pruned = save_model(root / "pruned", prune_half(make_tiny_model("llama")))
    return {"pruned": pruned, "adapter": save_adapter(root / "adapter", pruned), "data": write_jsonl(root / "d.jsonl")}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_the_error_chain_is_read_for_errno_and_for_safetensors_text():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    wrapped = RuntimeError("write failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "x")
    assert is_disk_full(wrapped)
    assert is_disk_full(Exception("Error while serializing: IoError(Os { code: 28, message: \"No space left on device\""))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied")) and not is_disk_full(ValueError("bad"))


def test_a_staged_write_that_needs_more_than_is_free_is_refused_before_writing(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(DiskFullError, match=r"it needs [\d,]+ bytes, [\d,]+ bytes free there"):
        with staged_output_dir(target, expected_bytes=2**62):
            raise AssertionError("nothing may be written")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_merge_into_a_full_disk_exits_2_with_one_line_and_leaves_nothing(inputs, small_disk, tmp_path, capsys):
    mount, fill = small_disk
    reference = tmp_path / "reference"
    argv = ["merge", "--model", str(inputs["pruned"]), "--adapter", str(inputs["adapter"]), "--output"]
    assert cli_main([*argv, str(reference)]) == 0
    capsys.readouterr()
    weights = sum(entry.stat().st_size for entry in reference.glob("*.safetensors"))
    # Room for the tensors (the check before writing passes) but not for everything the merge writes.
    fill(weights + PAGE)
    assert on_disk(reference) > free_bytes(mount)
    target = mount / "merged"
    assert cli_main([*argv, str(target)]) == 2
    line = one_error_line(capsys)
    assert "no space left" in line and str(target) in line and "bytes free there" in line
    assert sorted(entry.name for entry in mount.iterdir()) == ["filler"]  # no output, no staging directory

    fill(PAGE)  # less than the tensors: refused before anything is written, with the bytes it needs
    assert cli_main([*argv, str(target)]) == 2
    needed = int(re.search(r"it needs ([\d,]+) bytes", one_error_line(capsys)).group(1).replace(",", ""))
    assert weights - 16384 <= needed <= weights  # the tensors' bytes: the safetensors file less its header
    assert sorted(entry.name for entry in mount.iterdir()) == ["filler"]


def test_train_into_a_full_disk_exits_2_and_keeps_no_half_checkpoint(inputs, small_disk, capsys):
    mount, fill = small_disk
    fill(2 * PAGE)  # the first checkpoint (adapter, optimizer and scheduler state) does not fit
    output = mount / "trained"
    argv = ["train", "--model", str(inputs["pruned"]), "--adapter", str(inputs["adapter"]), "--output", str(output),
            "--data", str(inputs["data"]), "--seq-len", "32", "--batch-size", "4", "--max-steps", "2",
            "--save-steps", "1", "--threads", "1"]  # fmt: skip
    assert cli_main(argv) == 2
    line = one_error_line(capsys)
    assert "no space left" in line and str(output) in line and "bytes free there" in line
    left = [path for path in output.glob("checkpoint-*")] if output.exists() else []
    assert all((checkpoint / CHECKPOINT_MARKER).is_file() for checkpoint in left)  # only finished checkpoints stay
    assert not (output / "adapter_model.safetensors").exists()
    shutil.rmtree(output, ignore_errors=True)
