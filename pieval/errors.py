"""The one exception type for bad user input: the CLI prints it as a single line."""


class UserError(ValueError):
    """Bad input; the message names the bad value and the fix."""
