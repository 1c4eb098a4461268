"""Errors that reach the user as one clear line instead of a traceback."""


class InputError(ValueError):
    """Bad user input: a missing or malformed file, a wrong config key, type or range.

    The message names the file (or config key), the field and what was expected. The CLI
    prints it on one line and exits with status 2.
    """
