"""Distillation losses, and the teacher's top-k cached on disk.

A pruned model is healed by making its next-token distribution match the dense model's
(the teacher's). The full-vocabulary KL is exact; on a big vocabulary the teacher's top-k
tokens plus one bucket for the rest of its mass carry almost all of it, and k (token, log
probability) pairs per position are small enough to keep on disk for every training
window, so a second epoch needs no teacher forward pass at all.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def kl_full(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) on logits ``(..., V)``, at a
    temperature, scaled by T^2 so that its gradient keeps its size as T changes."""
    t = temperature
    student, teacher = student.float(), teacher.float()
    if t != 1:
        student, teacher = student / t, teacher / t
    log_q = F.log_softmax(student, dim=-1)
    log_p = F.log_softmax(teacher, dim=-1)
    # One fused pass over the logits (vocabulary-sized temporaries cost most here).
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="sum")
    return kl / (log_q.numel() // log_q.shape[-1]) * t * t


def teacher_top_k(teacher: torch.Tensor, k: int, temperature: float = 1.0):
    """The teacher's k most likely tokens at each position: ``(log_probs, indices)``."""
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    values, indices = log_p.topk(k, dim=-1)
    return values, indices


def kl_top_k(
    student: torch.Tensor,
    top_log_p: torch.Tensor,
    top_indices: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """KL(teacher || student) over k + 1 outcomes: the teacher's top-k tokens, and one
    bucket for all the others (each side's remaining mass). A lower bound of the full KL
    that is equal to it when the teacher puts all its mass on k tokens."""
    t = temperature
    log_q = F.log_softmax(student.float() / t, dim=-1)
    log_q_top = log_q.gather(-1, top_indices.long())
    p_top = top_log_p.exp()
    log_p_tail = torch.log1p(-p_top.sum(-1).clamp(max=1 - 1e-6))
    log_q_tail = torch.log1p(-log_q_top.exp().sum(-1).clamp(max=1 - 1e-6))
    kl = (p_top * (top_log_p - log_q_top)).sum(-1) + log_p_tail.exp() * (log_p_tail - log_q_tail)
    return kl.mean() * t * t


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each position's logits for the next token of ``ids``."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


class TopKCache:
    """The teacher's top-k for every training window, in two memory-mapped files that fill
    as windows are first seen (a third file marks which are filled).

    The files are only trusted for the same teacher, windows and k: the caller names the
    folder after those.
    """

    def __init__(self, folder: Path, num_windows: int, seq_len: int, k: int):
        folder.mkdir(parents=True, exist_ok=True)
        shape = (num_windows, seq_len, k)
        self.values = _memmap(folder / "log_probs.f32", np.float32, shape)
        self.indices = _memmap(folder / "indices.i32", np.int32, shape)
        self.filled = _memmap(folder / "filled.u8", np.uint8, (num_windows,))

    def get(self, rows: list[int], compute) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k of windows ``rows``; ``compute(missing_rows)`` gives those not yet cached."""
        missing = [r for r in rows if not self.filled[r]]
        if missing:
            values, indices = compute(missing)
            self.values[missing] = values.cpu().numpy()
            self.indices[missing] = indices.cpu().numpy().astype(np.int32)
            self.values.flush()
            self.indices.flush()
            self.filled[missing] = 1
            self.filled.flush()
        return torch.from_numpy(self.values[rows]), torch.from_numpy(self.indices[rows])


def _memmap(path: Path, dtype, shape) -> np.memmap:
    mode = (
        "r+"
        if path.exists() and path.stat().st_size == np.dtype(dtype).itemsize * int(np.prod(shape))
        else "w+"
    )
    return np.memmap(path, dtype=dtype, mode=mode, shape=shape)
