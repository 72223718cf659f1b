"""The one exception type users see: its message is a single line naming the problem and the fix."""


class OnnxqError(Exception):
    """A user-facing failure (bad model, bad data, bad flags); the CLI prints it without a traceback."""
