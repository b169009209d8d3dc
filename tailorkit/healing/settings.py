"""The settings of a healing run, checked before anything is loaded."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tailorkit.errors import HealError, validation_message

CHECKPOINT_PREFIX = "step-"
KEPT_CHECKPOINTS = 2
# Settings a resumed run must share with the run it continues (the others only change
# when it scores, writes or stops).
RUN_ONLY = ("eval_every", "checkpoint_every", "max_minutes")


class HealSettings(BaseModel):
    """How a pruned model is healed; checked before any model is loaded."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(200, ge=1, description="optimizer steps")
    lora_rank: int = Field(16, ge=1, description="LoRA rank (unless full)")
    full: bool = Field(False, description="train the chosen layers' weights, not a LoRA")
    train: str = Field(
        "all",
        description="layers that train: all, gaps (those beside each run of removed "
        "layers, and bridged ones), or output layer indices like 0,3,5-7",
    )
    learning_rate: float | None = Field(
        None, gt=0, description="peak learning rate (default 2e-4 with LoRA, 2e-5 full)"
    )
    batch_size: int = Field(4, ge=1, description="windows per step")
    seq_len: int = Field(256, ge=8, description="tokens per window")
    temperature: float = Field(1.0, gt=0, description="distillation temperature")
    kl_weight: float = Field(
        1.0,
        ge=0,
        le=1,
        description="share of the loss that is KL to the teacher (the rest: next-token loss)",
    )
    top_k: int | None = Field(
        None,
        ge=1,
        description="KL on the teacher's top-k tokens and a tail bucket (default: "
        "the whole vocabulary)",
    )
    teacher_cache: Literal["auto", "on", "off"] = Field(
        "auto", description="keep the teacher's top-k on disk (auto: when windows repeat)"
    )
    held_back: int = Field(8, ge=1, description="windows held back for scoring")
    eval_every: int = Field(50, ge=1, description="score the held-back windows every K steps")
    checkpoint_every: int = Field(50, ge=1, description="write a checkpoint every K steps")
    warmup: float = Field(0.05, ge=0, lt=1, description="share of the steps warming up")
    max_minutes: float | None = Field(None, gt=0, description="stop after this long")
    seed: int = Field(0, description="data order and LoRA initialisation")

    @model_validator(mode="after")
    def _cache_needs_top_k(self) -> HealSettings:
        if self.teacher_cache == "on" and self.top_k is None:
            raise ValueError(
                "teacher_cache on needs top_k: the whole vocabulary per token is too big to keep"
            )
        return self

    @classmethod
    def checked(cls, **values) -> HealSettings:
        try:
            settings = cls(**values)
        except ValidationError as e:
            raise HealError(validation_message("heal", e, "setting")) from None
        layer_list(settings.train, 10**9)  # its syntax, before anything is loaded
        return settings

    @property
    def lr(self) -> float:
        return self.learning_rate or (2e-5 if self.full else 2e-4)

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then a cosine to a tenth of the peak; step counts from 1."""
        warm = max(1, round(self.warmup * self.steps))
        if step <= warm:
            return self.lr * step / warm
        done = (step - warm) / max(1, self.steps - warm)
        return self.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, done))))


def layer_list(spec: str, num_layers: int) -> list[int] | str:
    """``all`` / ``gaps`` as they are, else the indices of ``0,3,5-7`` (checked)."""
    if spec in ("all", "gaps"):
        return spec
    out: set[int] = set()
    for part in spec.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise HealError(
                f"train {spec!r}: give all, gaps, or output layer indices like 0,3,5-7"
            ) from None
        if not 0 <= first <= last < num_layers:
            raise HealError(
                f"train {spec!r}: layer range {part.strip()} is outside 0..{num_layers - 1}"
            )
        out.update(range(first, last + 1))
    return sorted(out)
