"""The one error type for bad input: the command line prints `error: <message>` and exits 2 for any of them.

Each layer raises its own subclass (ConfigError, DataError, CheckpointError, ExportError), whose message names the
file, key or value and what was expected. Anything else that escapes is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Input the program cannot honour; the message is one line that says which file, key or value, and why."""


class UsageError(UserError, ValueError):
    """A command-line or function argument outside its range (also a ValueError, for library callers)."""
