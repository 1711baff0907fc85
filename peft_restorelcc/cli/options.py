"""Flags shared by the subcommands, spelled once: the model and its revision, deprecated spellings, output checks."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

REVISION_HELP = "branch, tag or commit sha of a Hub id given to --model (default: the default branch)"
MODEL_HELP = "embedded model name, local directory, or Hub id org/name (with --revision)"

# Old spellings already warned about in this process: each warns once, however often a parser sees it.
_WARNED: set[str] = set()


class DeprecatedAlias(argparse.Action):
    """An old spelling of a flag: stores into the new flag's ``dest`` and warns once (FutureWarning, so that users
    see it: DeprecationWarning is hidden outside ``__main__`` by default)."""

    def __init__(self, option_strings: list[str], dest: str, new: str, **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if option_string not in _WARNED:
            _WARNED.add(option_string)
            message = f"{option_string} is deprecated and will be removed in the next release; use {self.new}"
            # Attributed to the command, not to argparse's source line: the user sees one line naming the flag.
            warnings.warn_explicit(message, FutureWarning, filename=parser.prog, lineno=0)
        setattr(namespace, self.dest, values)


def add_deprecated(parser: argparse.ArgumentParser, old: str, new: str, dest: str, **kwargs: Any) -> None:
    """Accept ``old`` for ``new`` (same ``dest``), hidden from ``--help``."""
    parser.add_argument(old, dest=dest, action=DeprecatedAlias, new=new, help=argparse.SUPPRESS, **kwargs)


def add_model_arguments(
    parser: argparse.ArgumentParser,
    help: str = MODEL_HELP,
    required: bool = True,
    default: str | None = None,
    aliases: tuple[str, ...] = (),
) -> None:
    """``--model`` (and ``aliases``, other names of the same flag) and ``--revision`` (the revision applies to a Hub
    id; a local directory is used as it is)."""
    parser.add_argument("--model", *aliases, dest="model", required=required, default=default, metavar="MODEL",
                        help=help)  # fmt: skip
    parser.add_argument("--revision", default=None, metavar="REV", help=REVISION_HELP)


def require(args: argparse.Namespace, dest: str, flag: str) -> None:
    """A flag that is required but has a deprecated alias (argparse cannot require either of two spellings)."""
    if getattr(args, dest, None) is None:
        raise ValueError(f"the following argument is required: {flag}")


def check_output_dir(output: str | Path, flag: str = "--output", hint: str = "") -> Path:
    """``files.check_new_output_dir`` with the message naming ``flag``."""
    from ..io.files import check_new_output_dir

    return check_new_output_dir(output, label=flag, hint=hint)


TASKS_HELP = (
    "comma-separated lm-eval tasks: the paper's seven (boolq, rte, hellaswag, winogrande, arc_easy, arc_challenge, "
    "openbookqa; paper-bundled: all seven) are read from bundled copies, offline; any other name is a task of "
    "lm-eval's registry (`lm-eval ls tasks`) or of --include-path, evaluated with lm-eval's own definition "
    "(its dataset downloaded as lm-eval does)"
)


def add_task_arguments(parser: argparse.ArgumentParser, default: str | None = None, default_help: str = "") -> None:
    """``--tasks`` and ``--include-path`` (a folder of the user's own lm-eval task YAMLs), alike everywhere."""
    parser.add_argument("--tasks", default=default, metavar="TASK,...", help=f"{TASKS_HELP} ({default_help})")
    parser.add_argument(
        "--include-path",
        default=None,
        metavar="DIR",
        help="a folder of your own lm-eval task YAMLs (as lm-eval's --include_path); their names go to --tasks",
    )


DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_common_arguments(parser: argparse.ArgumentParser, device_help: str | None = None, seed: bool = True) -> None:
    """``--device``, ``--dtype`` and (unless ``seed=False``) ``--seed``, spelled and explained alike everywhere."""
    parser.add_argument(
        "--device", default=None, help=device_help or "torch device (default: cuda if available, else mps, else cpu)"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="dtype the models are loaded in (default auto: the checkpoint's own, fp32 where none is recorded)",
    )
    if seed:
        parser.add_argument("--seed", type=int, default=0, metavar="S", help="seed of data choice, order and init")


def check_common_arguments(args: argparse.Namespace) -> None:
    """An unknown ``--device`` fails before any work (one ValueError line)."""
    if getattr(args, "device", None) is not None:
        from ..io.devices import default_device

        default_device(args.device)


def add_force_argument(parser: argparse.ArgumentParser) -> None:
    """``--force``: use an adapter on a model other than the one it records as its base (train, eval, merge)."""
    parser.add_argument(
        "--force",
        action="store_true",
        help="use --adapter even though it records another base model (its weights fingerprint differs from "
        "--model's): an adapter is measured and trained for one model",
    )
