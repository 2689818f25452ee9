"""The error contract: which failures are the user's to fix, and which are visionmix's bugs.

A :class:`UserError` says that an input, a file or the environment is at fault (a bad argument, a missing dataset,
a damaged checkpoint, a directory another process holds, a model a backend cannot take); its message is one
sentence that names the argument or file and says what to do. The command line prints it as one line and exits
with status 2 (:func:`is_user_error`). Every other exception is a bug in visionmix: the command line shows its
traceback and asks for a report.

Each user error also derives from the built-in type a Python caller would catch (``ValueError`` for bad values and
files, ``TypeError`` for wrong types, ``OSError`` for the file system, ``RuntimeError`` for backends), so
``except ValueError`` keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """The input, a file or the environment is at fault; the message is one line naming it."""


class InvalidValue(UserError, ValueError):
    """An argument has a value outside what it accepts; the message names the argument and the accepted values."""


class InvalidType(UserError, TypeError):
    """An argument has the wrong type; the message names the argument and the expected type."""


class FileConflict(UserError, FileExistsError):
    """An output path holds something visionmix did not write (or must not replace without ``--force``)."""


class MissingFile(UserError, FileNotFoundError):
    """A file or directory the user named does not exist."""


class DirectoryBusy(UserError, OSError):
    """Another process holds the directory (see :func:`visionmix.files.hold_directory`)."""


class DataError(UserError, ValueError):
    """A dataset is missing, malformed or unusable; the message is one line saying which file and what to do."""


class UnreadableImage(UserError, OSError):
    """An image file that cannot be decoded; the message names it and says why."""


class DownloadError(UserError, OSError):
    """A download failed (no network, an HTTP error, a truncated transfer, a wrong sha256, an HTML page instead of
    the file); the message names the URL or file and what to do. Nothing half-written is left to look complete."""


class CheckpointError(UserError, ValueError):
    """A weights, state or run file is missing, damaged or does not fit its model; the message names the file."""


class ExportError(UserError, RuntimeError):
    """The model could not be exported, or the exported file disagrees with PyTorch."""


class DeployError(UserError, RuntimeError):
    """A backend could not be built, failed to run or computes something else than the eager model."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or gradient); the last good checkpoint is kept. Exit status 1."""


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; a checkpoint of the step reached was saved. ``signum`` says which signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class VisionmixWarning(UserWarning):
    """A warning the command line prints as one line ``visionmix: warning: ...`` (a skipped image, an unlockable
    file system)."""


class BadImageWarning(VisionmixWarning):
    """An unreadable image was skipped; the message names the file."""


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the user's to fix: a :class:`UserError`, or an ``OSError`` (the file system's answer about
    a path the user gave: missing, not permitted, disk full)."""
    return isinstance(exc, UserError | OSError)


def one_line(exc: BaseException | Warning | str, limit: int = 0) -> str:
    """The message of ``exc`` on one line (whitespace runs folded), or its type's name if it has none; cut to
    ``limit`` characters when ``limit`` > 0."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:limit] if limit > 0 else text


def first_line(exc: BaseException) -> str:
    """``Type: first line`` of a third-party error whose message runs on with its own traceback (ONNX,
    onnxruntime, inductor), cut to 300 characters."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first[:300]}"
