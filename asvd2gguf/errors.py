"""One exception type for everything a user can cause, so the CLI can print one line and exit."""


class UserError(Exception):
    """A problem with the user's input or environment; the message is shown as-is, no traceback."""


class AsvdWarning(UserWarning):
    """Something the user should know that does not stop the command; the CLI prints it as one line."""
