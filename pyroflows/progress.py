"""One progress-bar policy for every long loop (``fit``, ``distill``, the CLI).

``progress=None`` (the default everywhere) means *auto*: a tqdm bar on a
terminal, nothing when stderr is a file, a pipe or a CI log (tqdm's own
``disable=None`` mode), so logs never fill with carriage-return updates.
``True`` forces a bar and ``False`` silences it.
"""

from __future__ import annotations

from collections.abc import Iterable

from tqdm.auto import tqdm

__all__ = ["progress_bar"]


def progress_bar(iterable: Iterable, progress: bool | None = None, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)`` shown according to ``progress`` (see the module docstring)."""
    if progress not in (None, True, False):
        raise TypeError(f"progress must be None (auto), True or False, got {progress!r}")
    return tqdm(iterable, disable=None if progress is None else not progress, **kwargs)
