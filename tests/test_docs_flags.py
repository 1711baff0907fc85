"""Every ``restorelcc SUBCOMMAND --flag`` that the README or docs/*.md shows (in a fenced code block or an inline
`code` span) names a subcommand and flags that the command line parser has (issue 49, item 8)."""

import argparse
import re
from pathlib import Path

import pytest

from peft_restorelcc.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`]+)`")
# A command line starts with the program (after environment settings or `time -v`), then a word that names the
# subcommand (an upper-case placeholder such as COMMAND is no name). Prose that mentions the program mid-sentence,
# as error messages do ("in use by another restorelcc process"), is no command line.
COMMAND = re.compile(
    r"^\s*\$?\s*(?:[A-Z_][A-Z0-9_]*=\S*\s+)*(?:(?:/usr/bin/)?time(?:\s+-v)?\s+)?"
    r"(?:restorelcc|python -m peft_restorelcc)\s+([a-z][a-z0-9_-]*)(?=\s|$)(.*)"
)
FLAG = re.compile(r"(?:^|\s)(--[a-z][a-z0-9-]*)")
# Where one command ends and the shell's next begins.
SHELL_BREAK = re.compile(r"&&|\|\||;|\s\|\s|\s>|\)")


def subcommand_options(parser: argparse.ArgumentParser) -> dict[str, set[str]]:
    """Each subcommand's option strings (deprecated spellings included: they are still accepted)."""
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: set(sub._option_string_actions) for name, sub in subparsers.choices.items()}


def logical_lines(block: str) -> list[str]:
    """A code block's lines, comments removed and backslash continuations joined."""
    lines, current = [], ""
    for raw in block.splitlines():
        line = raw.split(" #")[0] if not raw.lstrip().startswith("#") else ""
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        lines.append(current + line)
        current = ""
    if current:
        lines.append(current)
    return lines


def doc_commands(text: str) -> list[tuple[str, list[str], str]]:
    """``(subcommand, flags, the command as written)`` for each restorelcc command line in a markdown text."""
    pieces = [line for block in FENCE.findall(text) for line in logical_lines(block)]
    # Inline spans are paired within a paragraph, so that a stray backtick cannot pair across a table.
    paragraphs = re.split(r"\n\s*\n", FENCE.sub("", text))
    pieces += [" ".join(span.split()) for paragraph in paragraphs for span in INLINE.findall(paragraph)]
    commands = []
    for segment in (segment for piece in pieces for segment in SHELL_BREAK.split(piece)):
        match = COMMAND.match(segment)
        if match:
            command, rest = match.groups()
            commands.append((command, FLAG.findall(rest), " ".join(f"{command}{rest}".split())))
    return commands


def unknown_flags(text: str, options: dict[str, set[str]]) -> list[str]:
    """One line for each subcommand or flag in ``text``'s command lines that the parser does not have."""
    problems = []
    for command, flags, written in doc_commands(text):
        if command not in options:
            problems.append(f"restorelcc {written}: no subcommand {command!r}")
            continue
        problems += [f"restorelcc {written}: {command} has no {flag}" for flag in flags if flag not in options[command]]
    return problems


@pytest.fixture(scope="module")
def options() -> dict[str, set[str]]:
    return subcommand_options(build_parser())


@pytest.mark.parametrize("path", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_documented_flags_exist(path, options):
    assert unknown_flags(path.read_text(encoding="utf-8"), options) == []


def test_the_docs_show_commands(options):
    """The check reads something: the README alone shows every subcommand."""
    shown = {command for command, _, _ in doc_commands((ROOT / "README.md").read_text(encoding="utf-8"))}
    assert shown >= set(options) - {"help"}


def test_a_made_up_flag_is_caught(options):
    planted = (
        "Prose with `restorelcc prune --model smollm2-135m --made-up 3` inline.\n\n"
        "```bash\n"
        "restorelcc calibrate --model m --pruned p \\\n"
        "    --num-heads 0.25 --no-such-flag --output out   # a comment --ignored\n"
        "restorelcc nosuchcommand --model m\n"
        "```\n"
    )
    assert unknown_flags(planted, options) == [
        "restorelcc calibrate --model m --pruned p --num-heads 0.25 --no-such-flag --output out: "
        "calibrate has no --no-such-flag",
        "restorelcc nosuchcommand --model m: no subcommand 'nosuchcommand'",
        "restorelcc prune --model smollm2-135m --made-up 3: prune has no --made-up",
    ]


def test_each_command_of_a_line_is_read(options):
    text = "`restorelcc prune --model smollm2-135m --sparsity 0.5 --output runs/p && restorelcc eval --bogus 1`"
    assert unknown_flags(text, options) == ["restorelcc eval --bogus 1: eval has no --bogus"]
