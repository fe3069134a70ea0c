"""One exception type for user mistakes, so the CLI can answer them with exit code 2."""


class InputError(ValueError):
    """Bad input from the user: the message says what is wrong and how to fix it."""


class Cancelled(RuntimeError):
    """The caller's cancel() returned True; nothing was written."""
