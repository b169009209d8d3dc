"""tailorkit's own exception types.

Every error caused by user input (a recipe, a checkpoint, a flag) is a
``TailorkitError``; the CLI prints its message and exits non-zero instead of a
traceback.  Messages name the file, tensor or field at fault and, where there is
one, the fix.
"""


class TailorkitError(Exception):
    """Base class for every error tailorkit raises on bad input."""


class RecipeError(TailorkitError, ValueError):
    """The recipe is malformed or does not fit its source models."""


class CheckpointError(TailorkitError, ValueError):
    """A checkpoint file or directory is missing, corrupt or unsupported."""


class MergeError(TailorkitError, ValueError):
    """A merge cannot be computed or produced non-finite values."""


class CalibrationError(TailorkitError, ValueError):
    """The calibration text cannot give the windows asked for."""


class MethodError(TailorkitError, ValueError):
    """A pruning method's settings are invalid or its target cannot be reached."""
