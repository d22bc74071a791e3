class UserError(Exception):
    """Bad input from the user: the CLI prints it as one line and exits with code 2."""


def first_line(e: Exception) -> str:
    """An exception as one line of text (its type where it says nothing)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
