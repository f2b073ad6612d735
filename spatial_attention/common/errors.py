"""User-facing errors: one line that names the file or option, what is wrong
and, where it helps, what to do."""
from pathlib import Path


class DataError(ValueError):
    """A problem with input data (a data folder, an image, a metadata line)."""


class OptionError(ValueError):
    """A command-line option or setting that cannot be used as given."""


class UnreadableFile(DataError):
    """A file that is there but cannot be used (cut off, damaged, not readable): never to be taken for a missing
    one. ``reason``: what is wrong, for a reader that names the file its own way."""

    def __init__(self, path, reason: str):
        super().__init__(str(path), reason)  # both: an error sent between processes is rebuilt from its args
        self.path, self.reason = Path(path), reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def quote(value, limit: int = 200) -> str:
    """``repr(value)`` for a one-line message, cut after ``limit`` characters with
    the full length added. Input quoted in an error or a skip reason can be any
    size (a 200 KB caption) and must not flood the log or summary.json; 200 keeps
    every caption of the ShapeWorld grammar (at most 176 characters) whole."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return repr(value)
    cut = repr(text[:limit]) if isinstance(value, str) else text[:limit]
    return f"{cut}... ({len(text)} characters)"


def input_folder(folder, option: str, holds: str, missing: str) -> Path:
    """``folder`` as a Path, once it is a folder; DataError where it is a file (``option`` should point at
    ``holds``) or nothing (``missing``: what was expected there, and how to make one)."""
    folder = Path(folder)
    if folder.is_file():
        raise DataError(f"{folder}: is a file, not a folder; point {option} at {holds}")
    if not folder.is_dir():
        raise DataError(f"{folder}: {missing}")
    return folder
