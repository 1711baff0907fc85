"""``restorelcc``: one subcommand per stage of the pipeline.

Each subcommand lives in its own module of this package and exposes ``register(subparsers)``, which adds its
parser and sets ``func`` to a callable taking the parsed ``argparse.Namespace`` and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Module names under peft_restorelcc.cli, in the order the pipeline runs.
COMMAND_MODULES = ("prune", "calibrate", "train", "merge", "eval", "run", "compare")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="restorelcc",
        description="Restore pruned LLMs with RestoreLCC (lost-component compensation of attention heads).",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{module_name}_command").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..io.files import DiskFullError, Terminated, handle_termination, is_disk_full

    try:
        # SIGTERM raises like Ctrl-C does, so that staging directories and lock files are removed on the way out.
        with handle_termination():
            return int(args.func(args) or 0)
    except ValueError as error:
        # Bad input is reported as one clear line, not a traceback.
        print(f"restorelcc {args.command}: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        if not is_disk_full(error):
            raise
        # A write outside the staged writers (results, checkpoints) that did not fit: one line, not a traceback.
        target = getattr(args, "output", None) or getattr(args, "output_dir", None) or "."
        print(f"restorelcc {args.command}: error: {DiskFullError(target)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"restorelcc {args.command}: interrupted; partial output removed", file=sys.stderr)
        return 130
    except Terminated as stop:
        print(f"restorelcc {args.command}: terminated; partial output removed", file=sys.stderr)
        return int(stop.code)


if __name__ == "__main__":
    sys.exit(main())
