"""The one exception type users see: a one-line message, exit code 2 from the CLI."""


class UserError(Exception):
    """Bad input or configuration. The message names what is wrong (file, line, field)."""
