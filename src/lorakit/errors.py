"""The one exception type the CLI shows as a message instead of a traceback."""


class LorakitError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""


def short(e: BaseException) -> str:
    """The first line of an exception's message (at most 400 characters), for a one-line error."""
    text = str(e).strip().splitlines()
    return text[0][:400] if text else type(e).__name__
