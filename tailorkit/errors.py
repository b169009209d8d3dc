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


class HubError(TailorkitError, ValueError):
    """Publishing failed: a bad repo id, no token, or the Hub refused the upload."""


class EvalError(TailorkitError, ValueError):
    """An evaluation cannot run as asked: a text too short, an unknown task, a bad setting."""


class HealError(TailorkitError, ValueError):
    """Healing cannot run or go on: a bad setting, a teacher that does not match, a loss
    that turned NaN, a checkpoint that cannot be written or belongs to another run."""


def validation_message(where: str, error, unknown: str, skip: tuple[str, ...] = ()) -> str:
    """A pydantic ``ValidationError`` as lines that name each bad field; ``unknown`` is
    said of a field that does not exist, ``skip`` drops location parts (union tags)."""
    lines = [where]
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"] if p not in skip)
        msg = unknown if err["type"] == "extra_forbidden" else err["msg"]
        msg = msg.removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}" if loc else f"  {msg}")
    return "\n".join(lines)
