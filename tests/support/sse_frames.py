"""An event stream's lines as a client reads them: each event a :class:`Frame`, each comment
(``: following``, keep-alives) its text."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["Frame", "Frames"]


@dataclass(frozen=True)
class Frame:
    """One SSE event: its id (``""`` without one), its type and its JSON data."""

    id: str
    event: str
    data: dict[str, Any]


class Frames:
    """Fed an event stream line by line: what each line completes (a frame at the blank line
    after it, a comment's text), else ``None``."""

    def __init__(self) -> None:
        self._id = self._event = self._data = ""

    def feed(self, line: str) -> Frame | str | None:
        name, _, value = line.partition(":")
        value = value.strip()
        if line.startswith(":"):
            return value
        if name == "id":
            self._id = value
        elif name == "event":
            self._event = value
        elif name == "data":
            self._data = value
        elif line == "" and self._event:
            frame = Frame(self._id, self._event, json.loads(self._data))
            self._id = self._event = self._data = ""
            return frame
        return None
