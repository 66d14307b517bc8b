"""The one error policy: a problem the user can fix (a parameter, a file, a missing GPU) is a UserError whose
message names the problem; a stage prints that message on one line and exits with status 2. Anything else
is a bug and keeps its traceback."""


class UserError(Exception):
    """A problem in the user's input or machine, worded for them: what, where, expected and actual."""


class ParamsError(UserError, ValueError):
    """A params.yaml problem: which key, what was expected, what was found."""


class DataError(UserError, ValueError):
    """A problem with the corpus or the prepared data."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used, with the file and the reason."""


class BackendUnavailable(UserError, RuntimeError):
    """A backend that cannot run on this machine, with the reason (never a silent fallback to another)."""


class StageKilled(BaseException):
    """The stage was told to stop (SIGTERM): unwinds like Ctrl-C, so its MLflow run ends KILLED."""


class StageError(UserError, RuntimeError):
    """A failure the user can act on; its message is the whole report."""
