"""Config, errors and small helpers shared by every hw2 script."""


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing folder, ...): printed as one line, no traceback."""
