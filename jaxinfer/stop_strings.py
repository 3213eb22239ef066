"""Stop strings in streamed text: finding them across token boundaries, and holding back a tail
that could still become one, so a stream never shows text it must later take back."""

from __future__ import annotations

from typing import Sequence


def find_stop(text: str, new_from: int, stops: Sequence[str]) -> tuple[int, str] | None:
    """The earliest stop string in ``text`` that overlaps ``text[new_from:]``: (index, stop)."""
    best = None
    for stop in stops:
        i = text.find(stop, max(0, new_from - len(stop) + 1))
        if i >= 0 and (best is None or i < best[0]):
            best = (i, stop)
    return best


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
