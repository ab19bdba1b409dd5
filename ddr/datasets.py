"""Prompt datasets: JSONL with a text field (the UnlearnCanvas metadata format) or plain text.

Prompts are made unique and sorted, as the original does, so a sample index means the same
prompt on every machine. Malformed lines are not fatal: they are counted and reported with
their line numbers, unless no prompt at all is left.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


class PromptFileError(ValueError):
    """A prompt file that cannot be used at all (missing, or not a single valid prompt)."""


@dataclass
class PromptFile:
    path: Path
    prompts: list[str]
    malformed: list[tuple[int, str]] = field(default_factory=list)

    def report(self) -> str:
        """A one-paragraph account of what was read, naming the malformed lines."""
        text = f"{len(self.prompts)} unique prompts from {self.path}"
        if self.malformed:
            shown = ", ".join(f"line {n} ({why})" for n, why in self.malformed[:10])
            more = f" and {len(self.malformed) - 10} more" if len(self.malformed) > 10 else ""
            text += f"; {len(self.malformed)} malformed lines skipped: {shown}{more}"
        return text


def _format_of(path: Path, format: str) -> Literal["jsonl", "text"]:
    if format != "auto":
        return format  # type: ignore[return-value]
    return "jsonl" if path.suffix in (".jsonl", ".json") else "text"


def load_prompts(path: Path, format: str = "auto", text_field: str = "text") -> PromptFile:
    """Unique, sorted prompts of a prompt file, with the malformed lines listed."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist")
    kind = _format_of(path, format)
    prompts: set[str] = set()
    malformed: list[tuple[int, str]] = []
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            line = line.strip()
            if not line:
                continue
            if kind == "text":
                prompts.add(line)
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                malformed.append((number, f"invalid JSON: {error.msg}"))
                continue
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str) or not text.strip():
                malformed.append((number, f"no non-empty string field {text_field!r}"))
                continue
            prompts.add(text.strip())
    result = PromptFile(path=path, prompts=sorted(prompts), malformed=malformed)
    if not result.prompts:
        raise PromptFileError(f"no valid prompt in {path}: {result.report()}")
    return result
