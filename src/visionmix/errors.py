"""The error contract: which failures are the user's to fix, and which are visionmix's bugs.

A :class:`UserError` says that an input, a file or the environment is at fault (a missing dataset, a damaged
checkpoint, a directory another process holds, a model a backend cannot take); its message is one sentence that
names the argument or file and says what to do. The command line prints it as one line and exits with status 2.
Every other exception is a bug in visionmix: the command line shows its traceback and asks for a report.

Each user error also derives from the built-in type a Python caller would catch (``ValueError`` for bad values and
files, ``OSError`` for the file system, ``RuntimeError`` for backends), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """The input, a file or the environment is at fault; the message is one line naming it."""


class DirectoryBusy(UserError, OSError):
    """Another process holds the directory (see :func:`visionmix.files.hold_directory`)."""


class VisionmixWarning(UserWarning):
    """A warning the command line prints as one line ``visionmix: warning: ...`` (a skipped image, an unlockable
    file system)."""
