"""Helpers of the tests that paste the docs' command blocks and read what they print."""

from __future__ import annotations

import json
from typing import Any


def answers(text: str) -> list[Any]:
    """The JSON documents printed one after another (curl -s adds no newline between)."""
    decoder, found, at = json.JSONDecoder(), [], 0
    while text[at:].strip():
        at += len(text[at:]) - len(text[at:].lstrip())
        value, at = decoder.raw_decode(text, at)
        found.append(value)
    return found
