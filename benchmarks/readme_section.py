"""Rewrite one generated section of the README, between its start and end markers."""

from __future__ import annotations

from pathlib import Path
from typing import Callable


def write_section(readme: Path, name: str, section: str, log: Callable[[str], None]) -> bool:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``readme``;
    False (and nothing written) when the markers are missing."""
    start_mark, end_mark = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = readme.read_text()
    if start_mark not in text or end_mark not in text:
        log(f"{readme.name} has no {start_mark} ... {end_mark} markers: not edited")
        return False
    start, end = text.index(start_mark) + len(start_mark), text.index(end_mark)
    readme.write_text(text[:start] + "\n" + section + "\n" + text[end:])
    log(f"{readme.name} {name} section rewritten")
    return True
