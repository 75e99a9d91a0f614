"""User-facing errors.

Everything a user can get wrong (names, config keys, data, devices, tracking) raises
:class:`ClframeError`; the CLI prints its message as one line and exits non-zero, so no
traceback ever reaches a user for bad input.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class ClframeError(Exception):
    """A problem the user can fix; the message names the fix."""


def closest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """Return a 'did you mean' hint for ``name`` among ``choices`` (empty when none is close)."""
    matches = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f" (did you mean {', '.join(matches)}?)" if matches else ""
