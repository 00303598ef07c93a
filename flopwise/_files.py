"""File-system checks shared by the commands that write results (no third-party imports)."""

from __future__ import annotations

import os
import tempfile


def check_writable(folder: str | os.PathLike, what: str, advice: str = "") -> None:
    """Raise ValueError, naming ``what``, unless a file can be made in ``folder``: make it
    (and the folders missing above it) and a file in it, then remove all that was made.
    ``os.access`` says yes to root everywhere, so without the probe a folder where nothing
    can be written (``/proc``, a read-only mount) failed only when the result was saved,
    after the work. ``advice`` ends the message (e.g. "pass another folder (--out)")."""
    folder = os.path.abspath(os.fspath(folder))
    for attempt in range(5):
        try:
            _probe(folder)
            return
        except FileNotFoundError as exc:
            # a folder made by another process sharing the parent (a sweep's jobs) was removed
            # by its own probe while this one worked inside it: try again
            if attempt == 4:
                error = exc
        except OSError as exc:
            error = exc
            break
    reason = error.strerror or str(error)
    raise ValueError(f"{what}: cannot write in {folder} ({reason})" + (f": {advice}" if advice else ""))


def _probe(folder: str) -> None:
    """Make ``folder`` and what is missing above it, and a file in it; remove what was made."""
    existing = folder
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    made: list[str] = []
    try:
        q = existing
        for part in os.path.relpath(folder, existing).split(os.sep) if folder != existing else ():
            q = os.path.join(q, part)
            try:
                os.mkdir(q)
            except FileExistsError:  # made meanwhile by another process
                if not os.path.isdir(q):
                    raise
                continue
            made.append(q)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    finally:
        for q in reversed(made):
            try:
                os.rmdir(q)  # only if still empty: another process may be using it by now
            except OSError:
                pass
