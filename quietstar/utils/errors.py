"""The errors a user's input causes, apart from bugs.

Code raises ``QuietStarInputError`` (a ValueError, so ``except ValueError`` still catches it) for
input it refuses: a setting, a file, a model or a tensor that cannot work, with a message that
names the problem and the fix. ``quietstar.cli.main.main`` prints these (and OSError: files,
permissions, the network) as one line with exit code 2; any other exception is a bug and keeps its
traceback (``QUIETSTAR_TRACEBACK=1`` shows the traceback of user errors too).
"""

from __future__ import annotations


class QuietStarInputError(ValueError):
    """Bad input: the message says what is wrong and how to fix it."""


class MissingDependencyError(ImportError, QuietStarInputError):
    """An optional package that a chosen setting needs is not installed (the message says what to
    ``pip install``). An ImportError, so ``except ImportError`` still catches it."""
