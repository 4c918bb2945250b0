"""What goes wrong in a search space (`SpaceError`), and how its messages and the dry run write numbers (`fmt`)."""

from __future__ import annotations


class SpaceError(ValueError):
    """A search space is invalid; the message names the file, the key, the value and what is allowed."""


def fmt(x) -> str:
    """A number as messages and the dry run write it: a whole float without ".0" (16, not 16.0), others with %g."""
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e6:
        return str(int(x))
    return f"{x:g}" if isinstance(x, float) else str(x)
