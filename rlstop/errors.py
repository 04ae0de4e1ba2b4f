"""Errors that mean *the user's input is wrong* (exit status 2, one line)."""


class UserError(Exception):
    """Bad input: an unknown key, a wrong type, a missing file, an impossible value.

    The message is one line that says what is wrong and how to fix it (whitespace, newlines
    included, is collapsed). The CLI prints it as ``error: <message>`` and exits with status 2,
    having written nothing.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
