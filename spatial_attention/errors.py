"""User-facing errors: one line that names the file or option, what is wrong
and, where it helps, what to do."""


class DataError(ValueError):
    """A problem with input data (a data folder, an image, a metadata line)."""


class OptionError(ValueError):
    """A command-line option or setting that cannot be used as given."""
