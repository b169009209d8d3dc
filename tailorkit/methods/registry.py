"""How a method describes itself, once: a :class:`MethodSpec` that the command line, the
model card and the checks made before any model is loaded all read.

A method is a function ``(ctx, settings) -> MethodResult`` registered with :func:`register`
with its summary, model-card label and paragraph, BibTeX, and settings: a pydantic model
(type, default, range and help of each; cross-field rules as validators) whose ``flags``
`tailorkit prune` offers as options, the rest through ``--set NAME=VALUE``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from tailorkit.errors import MethodError, validation_message
from tailorkit.recipe import OutputLayer, Recipe
from tailorkit.trials import BASE, TrialRunner


class Settings(BaseModel):
    """A method's settings: typed, with defaults, ranges and help; unknown names are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)
    flags: ClassVar[tuple[str, ...]] = ()  # offered by `tailorkit prune` as --options
    # Help shared by the methods' settings of the same name.
    TARGET_RATIO: ClassVar[str] = "fraction of the parameters to remove, in (0, 1)"
    THRESHOLD: ClassVar[str] = (
        "similarity the pruned model's final states must keep (instead of target_ratio)"
    )
    KEEP_SINKS: ClassVar[str] = (
        "also count the attention-sink tokens (massive activations), which otherwise "
        "dominate a similarity pooled over tokens such as CKA"
    )
    SKIP_SINKS: ClassVar[str] = (
        "leave the attention-sink tokens out of Block Influence / angular distance (off by "
        "default: the layer that writes the sink shows only on the sink tokens)"
    )


@dataclass
class Context:
    """What every method may use; built once by :func:`tailorkit.prune`."""

    runner: TrialRunner  # the base model, its recorded states on the calibration windows
    work_dir: Path  # where a method may write figures
    candidates: list[str] = field(default_factory=list)  # fine-tunes of the base (gptailor)
    seed: int = 0  # the seed the calibration windows were drawn with

    @property
    def base(self) -> str:
        """The base model reference, as the recipe names it."""
        return self.runner.config.base

    def recipe(self, plan: list[OutputLayer]) -> Recipe:
        """The Recipe of a plan made of the base's layers (runs of kept layers: ranges)."""
        return Recipe.from_layers({BASE: self.base}, plan)


@dataclass
class MethodResult:
    recipe: Recipe
    report: dict[str, Any] = field(default_factory=dict)  # figures as plain JSON data
    images: dict[str, Path] = field(default_factory=dict)  # caption -> PNG
    files: dict[str, Path] = field(default_factory=dict)  # name -> file or folder to ship


@dataclass(frozen=True)
class MethodSpec:
    name: str
    run: Callable[[Context, Any], MethodResult]
    settings: type[Settings]
    summary: str  # one line: what the method does
    label: str  # the model card's name of the method, with the paper
    description: str  # the model card's paragraph
    citation: str  # BibTeX
    takes_candidates: bool = False

    def parse(self, values: dict[str, Any]) -> Settings:
        """``values`` checked and completed with defaults; MethodError names what is wrong."""
        try:
            return self.settings.model_validate(values)
        except ValidationError as e:
            takes = ", ".join(self.settings.model_fields)
            raise MethodError(
                validation_message(
                    f"method {self.name!r}: invalid settings",
                    e,
                    f"unknown setting; {self.name} takes {takes}",
                )
            ) from None


METHODS: dict[str, MethodSpec] = {}


def register(name: str, **facts: Any) -> Callable:
    """Register the decorated ``run(ctx, settings)`` under ``name``, with the other facts of
    :class:`MethodSpec` (settings, summary, label, description, citation, ...)."""

    def add(run: Callable[[Context, Any], MethodResult]) -> Callable:
        METHODS[name] = MethodSpec(name, run, **facts)
        return run

    return add
