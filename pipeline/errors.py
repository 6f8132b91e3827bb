"""The one exception type a user can cause: the CLI prints it as a single line and exits non-zero."""


class UserError(Exception):
    """A problem with the user's input, named along with what to do about it."""
