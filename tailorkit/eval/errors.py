"""The error type of tailorkit's evaluation (bad input: files, task names, settings)."""

from tailorkit.errors import TailorkitError


class EvalError(TailorkitError, ValueError):
    """An evaluation cannot run as asked: a text too short, an unknown task, a bad setting."""
