"""The finished stages of a long job in its output directory, each with the settings that made it.

``restorelcc run --resume`` reads ``stages.json``: a stage whose recorded settings equal today's is reused (its
output on disk, its recorded result); any other is redone, and so is every stage that consumes its output. A stage is recorded only once its output is complete, so a job killed mid-stage redoes that
stage. Written atomically (io.checks.write_json_atomic).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .checks import write_json_atomic

STAGES_FILE = "stages.json"
SCHEMA_VERSION = 1


def _normalised(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as JSON gives them back (tuples as lists, int keys as strings): compared after a round trip."""
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


class StageRecord:
    """``stages.json`` of ``output``: which stages finished under which settings. ``consumers`` maps a stage to the
    stages that read its output. Without ``resume`` nothing is reused and the record starts afresh."""

    def __init__(
        self,
        output: str | os.PathLike,
        consumers: Mapping[str, Sequence[str]],
        resume: bool = False,
        log: Callable[[str], None] = print,
    ) -> None:
        self.path = Path(output) / STAGES_FILE
        self.consumers, self.log = consumers, log
        self.stages: dict[str, dict[str, Any]] = {}
        if resume and self.path.is_file():
            document = json.loads(self.path.read_text())
            if document.get("schema_version") == SCHEMA_VERSION:
                self.stages = document.get("stages", {})
        self.reused: list[str] = []

    def reusable(self, name: str, settings: dict[str, Any]) -> bool:
        """True when ``name`` finished under ``settings`` (and was not invalidated since)."""
        entry = self.stages.get(name)
        return entry is not None and entry["settings"] == _normalised(settings)

    def reuse(self, name: str, settings: dict[str, Any], where: str | os.PathLike | None = None) -> Any | None:
        """The recorded result of ``name`` when it is reusable (saying so), else None after invalidating it and
        the stages that consume it: the caller redoes them."""
        if self.reusable(name, settings):
            self.reused.append(name)
            self.log(f"resume: reusing {name}" + (f" ({where})" if where is not None else ""))
            return self.stages[name].get("result", {})
        self.invalidate(name)
        return None

    def invalidate(self, name: str) -> None:
        """Forget ``name`` and, transitively, the stages that consume it (written at once, before any is redone:
        a stage redone under the same settings overwrites what they read)."""
        doomed, todo = set(), [name]
        while todo:
            stage = todo.pop()
            if stage not in doomed:
                doomed.add(stage)
                todo.extend(self.consumers.get(stage, ()))
        if doomed & set(self.stages):
            for stage in doomed:
                self.stages.pop(stage, None)
            self._write()

    def record(self, name: str, settings: dict[str, Any], result: Any = None) -> Any:
        """``name`` finished under ``settings`` with ``result`` (JSON-able; ``{}`` when it left only files); returns
        ``result``."""
        self.stages[name] = {"settings": _normalised(settings), "result": {} if result is None else result}
        self._write()
        return result

    def _write(self) -> None:
        write_json_atomic(self.path, {"schema_version": SCHEMA_VERSION, "stages": self.stages})  # never half a record
