"""Errors a user can act on: each names the thing that is wrong and what to do.

Every command line of the package ends through :func:`guarded`, so a failure is one
``moloch: error: ...`` line and an exit code by one convention: 2 for bad input (a
profile, a data file, an argument), 1 for a step that could not be done, 130 for Ctrl-C.
Nothing computed is lost in any of these cases: finished units, cached model calls and
written files stay, and the same command resumes.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable

BAD_INPUT, FAILED, INTERRUPTED = 2, 1, 130


class MolochError(Exception):
    """Base class; ``str(err)`` is the whole message a user sees."""

    exit_code = BAD_INPUT


class DataError(MolochError):
    """An input file is missing, corrupt or malformed."""


class ProfileError(MolochError):
    """A run profile is unknown or invalid."""


class ModelError(MolochError):
    """A model backend could not serve a request."""

    exit_code = FAILED


class CacheMissError(ModelError):
    """Replay mode was asked for a completion the cache does not hold."""


class StageError(MolochError):
    """A pipeline stage cannot run (missing inputs, a concurrent run, a failed notebook...)."""

    exit_code = FAILED


def guarded(main: Callable[[], int]) -> int:
    """Run a command's ``main`` and turn every expected failure into one line and a code."""
    try:
        return main()
    except KeyboardInterrupt:
        print(
            "moloch: interrupted; finished work is kept: run the same command to resume",
            file=sys.stderr,
        )
        return INTERRUPTED
    except MolochError as err:
        print(f"moloch: error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
            raise
        where = f" writing {err.filename}" if err.filename else ""
        print(
            f"moloch: error: {err.strerror}{where}: free space or fix the permissions and run "
            f"the same command again (finished work is kept)",
            file=sys.stderr,
        )
        return FAILED
