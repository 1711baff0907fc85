"""What every subcommand prints when it is done: its summary rows, labels aligned."""

from __future__ import annotations

from collections.abc import Sequence


def print_rows(rows: Sequence[tuple[str, str]]) -> None:
    """One ``label  value`` line per row, the values in one column."""
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
