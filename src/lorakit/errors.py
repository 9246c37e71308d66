"""The one exception type the CLI shows as a message instead of a traceback."""


class LorakitError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""
