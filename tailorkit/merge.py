"""The merge methods: how one output tensor is computed from its source tensors.

Most methods are a fixed linear combination of their inputs, so they share one
fused kernel (``ops.weighted_sum``) and can be computed chunk by chunk, which
keeps memory near one chunk however large the tensor.  Slerp is a linear
combination too once its angle is known (one reduction pass first); TIES needs
the whole task vector for its magnitude threshold and runs its own kernel.

Every method is applied to every tensor of a layer, norms included: there is
no silent "keep the first layer's norms".
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from tailorkit import ops
from tailorkit.combine import (
    CHUNK_ELEMENTS,
    COMBINATIONS,
    ChunkBuffer,
    Combination,
    combination,
    nonfinite_error,
)
from tailorkit.recipe import OutputLayer

# Linear combinations: (layer, inputs, base) -> (tensors, coefficients); the ones whose
# coefficients follow from the recipe alone are combine.py's, which the build also
# computes without torch.
LINEAR_METHODS: dict[str, Combination] = dict(COMBINATIONS)

# Slerp falls back to linear interpolation when the two tensors are this close to parallel.
SLERP_PARALLEL_COS = 0.9995


@combination("slerp", LINEAR_METHODS)
def _slerp(layer, inputs, base):
    a, b = inputs
    t = layer.param("t")
    dot = norm_a = norm_b = 0.0
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    for start in range(0, flat_a.numel(), CHUNK_ELEMENTS):
        ca = flat_a[start : start + CHUNK_ELEMENTS].double()
        cb = flat_b[start : start + CHUNK_ELEMENTS].double()
        dot += float(ca @ cb)
        norm_a += float(ca @ ca)
        norm_b += float(cb @ cb)
    if norm_a == 0 or norm_b == 0:
        return [a, b], [1.0 - t, t]
    cos = max(-1.0, min(1.0, dot / math.sqrt(norm_a * norm_b)))
    if abs(cos) > SLERP_PARALLEL_COS:
        return [a, b], [1.0 - t, t]
    omega = math.acos(cos)
    return [a, b], [
        math.sin((1 - t) * omega) / math.sin(omega),
        math.sin(t * omega) / math.sin(omega),
    ]


@dataclass(frozen=True, eq=False)
class Gather:
    """Keep only ``index`` along ``axis`` of a tensor (width pruning's kept MLP channels).

    A 1-D tensor (a bias) is gathered as a column. Every method but TIES is a weighted sum
    of its inputs, elementwise, so gathering commutes with it: the inputs are gathered a
    chunk of output rows at a time, straight from the mapped shards, and merged in the same
    pass (``ops.gather_weighted_sum``).
    """

    index: torch.Tensor  # (N,) int64, ascending
    axis: int

    def shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        out = list(shape)
        out[self.axis] = len(self.index)
        return tuple(out)

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        return t.index_select(self.axis, self.index.to(t.device))

    def chunks(
        self,
        tensors: Sequence[torch.Tensor],
        coefficients: Sequence[float],
        out_dtype: torch.dtype,
        chunk_elements: int | None,
        nonfinite: torch.Tensor | None = None,
        buffer: ChunkBuffer | None = None,
    ) -> Iterator[torch.Tensor]:
        """``sum_i c_i gather(t_i)``, flattened, in chunks of whole output rows (made in
        ``buffer`` if given); the NaN and inf values made are counted into ``nonfinite``."""
        mats = [t.reshape(t.shape[0], -1) for t in tensors]  # (R, C): a bias is (R, 1)
        index = self.index.to(mats[0].device)
        rows, cols = self.shape(mats[0].shape)
        step = max(1, (chunk_elements or rows * cols) // max(cols, 1))
        for start in range(0, rows or 1, step):
            shape = (min(step, rows - start), cols)
            out = buffer.view(shape, out_dtype) if buffer is not None and rows else None
            if self.axis == 0:  # rows of the sources: only those are read
                index_part = index[start : start + step]
                part = ops.gather_weighted_sum(
                    mats, coefficients, index_part, 0, out_dtype, out, nonfinite=nonfinite
                )
            else:  # a block of rows of each source, its kept columns
                block = [m[start : start + step] for m in mats]
                part = ops.gather_weighted_sum(
                    block, coefficients, index, 1, out_dtype, out, nonfinite=nonfinite
                )
            yield part.reshape(-1)


def merge_chunks(
    layer: OutputLayer,
    inputs: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    out_dtype: torch.dtype,
    *,
    where: str,
    chunk_elements: int | None = CHUNK_ELEMENTS,
    gather: Gather | None = None,
    buffer: ChunkBuffer | None = None,
) -> Iterator[torch.Tensor]:
    """The flattened output tensor, in order, a chunk at a time; ``where`` names it in errors.

    The build writes each chunk as it comes, so its memory stays near one chunk; with a
    ``buffer``, the same memory every time (each chunk then lives until the next is made).
    ``gather``: only these channels of the output are made.
    """
    if layer.method == "ties":
        thresholds = ops.ties_thresholds(base, list(inputs), layer.param("density"))
        result = ops.ties_merge(base, list(inputs), thresholds, layer.param("lambda"), out_dtype)
        if gather is not None:  # TIES's threshold is over the whole tensor: gather after
            result = gather.apply(result)
        check_finite(result, where)
        yield result.reshape(-1)
        return
    tensors, coefficients = LINEAR_METHODS[layer.method](layer, inputs, base)
    # The kernels count NaN and inf as they write (a copy is not checked).
    counter = None if layer.method == "passthrough" else new_counter(tensors[0].device)
    if gather is not None:
        parts = gather.chunks(tensors, coefficients, out_dtype, chunk_elements, counter, buffer)
        for chunk in parts:
            raise_if_nonfinite(counter, where)
            yield chunk
            del chunk
        return
    flat = [t.reshape(-1) for t in tensors]
    n = flat[0].numel()
    step = max(1, chunk_elements or n)
    for start in range(0, n or 1, step):  # an empty tensor still yields one (empty) chunk
        part = [t[start : start + step] for t in flat]
        out = buffer.view((len(part[0]),), out_dtype) if buffer is not None else None
        chunk = ops.weighted_sum(part, coefficients, out_dtype, out, nonfinite=counter)
        raise_if_nonfinite(counter, where)
        yield chunk
        del chunk  # written by now: not alive while the next one is computed


def merge_tensor(
    layer: OutputLayer,
    inputs: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    out_dtype: torch.dtype,
    *,
    where: str,
    gather: Gather | None = None,
) -> torch.Tensor:
    """Compute one whole output tensor (the in-memory path)."""
    (flat,) = merge_chunks(
        layer, inputs, base, out_dtype, where=where, chunk_elements=None, gather=gather
    )
    shape = inputs[0].shape
    return flat.reshape(gather.shape(shape) if gather else shape)


def new_counter(device: torch.device | str = "cpu") -> torch.Tensor:
    """A counter for the ``nonfinite`` argument of :func:`ops.weighted_sum`."""
    return torch.zeros((), dtype=torch.int64, device=device)


def raise_if_nonfinite(counter: torch.Tensor | None, where: str) -> None:
    """Raise MergeError if a merge counted NaN or inf values into ``counter``."""
    if counter is not None and (bad := int(counter)):
        raise nonfinite_error(bad, where)


FINITE_CHECK_ELEMENTS = 1 << 20  # torch.isfinite's temporaries are ~6x its input: count in slices


def check_finite(t: torch.Tensor, where: str) -> None:
    """Raise MergeError, counting them, if ``t`` holds NaN or inf.

    The test is one reduction, ``aminmax``: NaN propagates through min and max, an inf is
    the min or the max, and it makes no temporaries. ``torch.isfinite`` in slices cost ~10x
    more on bfloat16 (0.03 s vs 0.003 s per 16M elements on 2 quiet cores, against 0.02 s
    for the merge itself); it only counts, once something is known to be wrong.
    """
    if not t.is_floating_point() or t.numel() == 0:
        return
    low, high = torch.aminmax(t.reshape(-1))
    if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
        return
    flat, step = t.reshape(-1), FINITE_CHECK_ELEMENTS
    bad = sum(int((~torch.isfinite(flat[i : i + step])).sum()) for i in range(0, len(flat), step))
    raise nonfinite_error(bad, where)
