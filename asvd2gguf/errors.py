"""One exception type for everything a user can cause, so the CLI can print one line and exit."""


class UserError(Exception):
    """A problem with the user's input or environment; the message is shown as-is, no traceback."""
