"""User-facing errors: the CLI prints their message as one line and exits 2 (no traceback)."""


class UserError(ValueError):
    """A mistake in the user's input (config, file, key, row): one-line message, exit code 2."""


class ConfigError(UserError):
    """A bad config: unknown key, wrong type, missing file."""


class DataError(UserError):
    """Bad input data that cannot be recorded row by row (no input files matched, an unreadable dataset)."""
