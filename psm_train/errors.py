"""Errors the user fixes outside the code: a setting, an input, the disk, another process. A leaf: imports nothing.

ConfigError (and DataError) are shared by config and data; RunStopped by the checkpoint store and the run lock.
The CLI prints each as one line, without a traceback.
"""


class ConfigError(ValueError):
    """A configuration that cannot be run; the message names the source and the field."""


class DataError(ConfigError):
    """Unusable data or data options; the message names the file or option and what was expected.

    A ConfigError, so that the CLI reports it in one line like any other bad setting.
    """


class RunStopped(RuntimeError):
    """A run that cannot go on for a reason outside the code (a full disk, a run directory in use); the message
    names the step, path or process and what to do."""
