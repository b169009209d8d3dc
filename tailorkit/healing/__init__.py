"""Healing: distil the dense model back into a pruned one (``tailorkit heal``).

A pruned model loses most where its layers were cut. A short training run that makes its
next-token distribution match the dense model's (knowledge distillation, as Minitron
recovers its pruned models) wins much of it back. The student trains through a LoRA
(peft; merged into the weights at the end, so the result is a plain checkpoint of the
same shape) or its chosen layers' own weights; the loop runs under accelerate, so
``accelerate launch -m tailorkit.cli heal ...`` spreads the same command over GPUs.

Reproducible and restartable: the batch of step s is a function of the seed and s only,
the learning rate a function of s, and every ``checkpoint_every`` steps the trained
weights, the optimizer and the history are written atomically, so ``resume=True`` after
a kill reaches the weights an uninterrupted run would.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tailorkit.errors import HealError
from tailorkit.healing.result import HealResult
from tailorkit.healing.settings import HealSettings

__all__ = ["HealResult", "HealSettings", "heal"]


def heal(
    model,
    *,
    teacher=None,
    data=None,
    out: str | Path | None = None,
    checkpoints: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    progress: bool = True,
    **settings,
) -> HealResult:
    """Distil ``teacher`` into ``model`` and return the healed model.

    ``model``: a built checkpoint folder, a recipe file, a Recipe or a PruneResult (a
    recipe is assembled in memory). ``teacher``: a model folder or reference; by default
    the recipe's base model. ``data``: training text as for calibration (None: the
    bundled text; a file, a folder, a JSONL file with a ``text`` field, or
    ``hf:DATASET[:SPLIT[:COLUMN]]``). ``out``: also save the result there.
    ``checkpoints``: where the run's checkpoints go (default: ``OUT-checkpoints``, or a
    temporary folder without ``out``); they are removed once the result is saved.
    ``settings``: see :class:`HealSettings`.
    """
    from tailorkit.healing.trainer import (
        Trainer,
        checkpoints_in,
        load_student,
        load_teacher,
        make_windows,
    )

    config = HealSettings.checked(**settings)
    if resume and checkpoints is None and out is None:
        raise HealError("resume=True needs the checkpoints folder: pass out= or checkpoints=")
    if out is not None:
        _check_out(Path(out), overwrite)
    scratch = tempfile.TemporaryDirectory(prefix="tailorkit-heal-")
    folder = Path(checkpoints or (f"{Path(out).absolute()}-checkpoints" if out else scratch.name))
    earlier = checkpoints_in(folder)
    if earlier and not resume:
        raise HealError(
            f"{folder}: holds checkpoints of an earlier run (up to {earlier[-1].parent.name}); "
            "continue it with resume=True (--resume), or choose another checkpoints folder "
            "(--checkpoints); nothing was removed"
        )
    student = load_student(model, device)
    teach = load_teacher(teacher, student, device)
    windows = make_windows(student.tokenizer, data, config)
    trainer = Trainer(student, teach, windows, config, folder, device, progress)
    if resume:
        trainer.resume()
    trainer.run()
    result = trainer.result(Path(scratch.name), data)
    result.scratch = scratch
    result.is_main = trainer.acc.is_main_process
    if out is not None and result.is_main:  # under accelerate launch: one writer
        result.save_pretrained(out, overwrite=overwrite)
        if checkpoints is None:
            shutil.rmtree(folder, ignore_errors=True)
    trainer.acc.wait_for_everyone()
    return result


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse a taken output path now, not after the training ran."""
    from tailorkit.checkpoint.writer import may_replace

    if out.exists() or out.is_symlink():
        may_replace(out, overwrite)
