"""The one exception type the CLI shows to users as a single line."""


class AtdError(Exception):
    """A user-facing failure: bad input, unsupported model, existing output."""
