"""Exceptions that cross module boundaries; the CLI turns `VlmtileError` into a one-line message."""


class VlmtileError(Exception):
    """A problem the user can fix (bad option, unusable output directory, nothing to do)."""


class ImageError(Exception):
    """One input could not become pixels; its message is the human-readable reason in the error record."""
