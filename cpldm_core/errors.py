"""Errors a user can fix. The CLI prints them as one line (``--debug`` shows the traceback)."""


class UserError(ValueError):
    """Bad input or configuration. The message names the thing (file, row, column, key) and the fix."""
