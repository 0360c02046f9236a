"""The one exception type that the CLI turns into a single-line message and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user: the message names what is wrong and how to fix it.

    ``main.py`` catches it, prints ``error: <message>`` on one line to stderr and exits with
    status 2, without a traceback.
    """
