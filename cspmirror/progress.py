"""Progress bars, one rule for every command and benchmark: a bar only on a terminal (on stderr), and never when
the caller turns bars off (``--no-progress``). In CI logs and piped output a bar is no help and, redrawn, spams
the log, so there it is silent (as tqdm's ``disable=None``, on the stream the bar writes to)."""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm.auto import tqdm


def show_progress(enabled: bool = True) -> bool:
    """Whether a bar is drawn: ``enabled`` and stderr is a terminal."""
    return enabled and sys.stderr.isatty()


def progress_bar(iterable: Iterable, desc: str, *, enabled: bool = True, **kwargs: object) -> tqdm:
    """``tqdm(iterable, desc=desc, ...)``, disabled unless :func:`show_progress` (a disabled bar still iterates
    and takes ``set_postfix``); ``kwargs`` go to tqdm."""
    return tqdm(iterable, desc=desc, dynamic_ncols=True, disable=not show_progress(enabled), **kwargs)
