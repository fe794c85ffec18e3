"""The one exception type users see: a one-line message, exit code 2 from the CLI."""


class UserError(Exception):
    """Bad input or configuration. The message names what is wrong (file, line, field)."""


def user_error_in(err: BaseException) -> UserError | None:
    """The UserError behind `err`, which may be Ray's wrapper of a remote one (its `cause`)."""
    cause = getattr(err, "cause", err)
    return cause if isinstance(cause, UserError) else None
