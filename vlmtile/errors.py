"""Exceptions that cross module boundaries; the CLI turns `VlmtileError` into a one-line message."""


class VlmtileError(Exception):
    """A problem the user can fix (bad option, unusable output directory, nothing to do)."""


class ImageError(Exception):
    """One input could not become pixels; its message is the human-readable reason in the error record."""


class RunStopped(VlmtileError):
    """A run stopped before its end (interrupted, disk full, --max-errors): what finished is kept, and the
    same command run again continues. `summary` is the state of the output directory at the stop."""

    def __init__(self, message: str, summary: object = None) -> None:
        super().__init__(message)
        self.summary = summary
