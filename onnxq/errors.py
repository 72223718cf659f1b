"""The one exception type users see: its message is a single line naming the problem and the fix."""


class OnnxqError(Exception):
    """A user-facing failure (bad model, bad data, bad flags); the CLI prints it without a traceback."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type when empty), to quote inside a one-line error."""
    text = str(err).strip().splitlines()
    return text[0][:160] if text else type(err).__name__
