"""How alike are the layers? Batched CKA, Block Influence and angular distance.

CKA (Kornblith et al. 2019) compares two representations of the same examples
(here: tokens) through their kernel matrices. We use the minibatch estimator
of Nguyen, Raghu and Kornblith (2021): the unbiased HSIC (``ops.hsic_all_pairs``)
is summed over minibatches of tokens and normalised at the end,

    CKA(i, j) = sum_b HSIC_b(i, j) / sqrt(sum_b HSIC_b(i, i) * sum_b HSIC_b(j, j)),

so memory stays at one minibatch's Gram matrices while the estimate uses all
tokens. Every layer pair is computed at once: one batched GEMM makes the
L Gram matrices and two GEMMs give all L x L HSIC values. HSIC is accumulated
in float64 and never rounded (the reference SLM code truncated it to integers).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from tailorkit import ops
from tailorkit.errors import MethodError

KERNELS = ("linear", "rbf")
DEFAULT_MINIBATCH = 512


def gram_matrices(features: torch.Tensor, kernel: str = "linear") -> torch.Tensor:
    """``(L, n, d)`` features -> ``(L, n, n)`` float64 Gram matrices.

    The features are centred first: HSIC's unbiased estimator does not change, but
    the Gram entries shrink, so the float32 product loses less. ``rbf`` uses
    ``exp(-|x - y|^2 / (2 sigma^2))`` with sigma the median pairwise distance of
    each layer's minibatch (the median heuristic).
    """
    if kernel not in KERNELS:
        raise MethodError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    x = features.float()
    x = x - x.mean(dim=1, keepdim=True)  # (L, n, d)
    gram = torch.bmm(x, x.transpose(1, 2)).double()  # (L, n, n)
    if kernel == "linear":
        return gram
    sq = gram.diagonal(dim1=1, dim2=2)  # (L, n): |x_i|^2
    dist2 = (sq[:, :, None] + sq[:, None, :] - 2 * gram).clamp_min(0)  # (L, n, n)
    n = dist2.shape[1]
    upper = torch.triu_indices(n, n, offset=1, device=dist2.device)
    median = dist2[:, upper[0], upper[1]].median(dim=1).values  # (L,): median of d^2
    sigma2 = median.clamp_min(torch.finfo(torch.float64).tiny)  # sigma^2 = median(d)^2
    return torch.exp(-dist2 / (2 * sigma2[:, None, None]))


def cka_matrix(
    batches: Iterable[torch.Tensor],
    *,
    kernel: str = "linear",
    minibatch: int = DEFAULT_MINIBATCH,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Minibatch CKA between every pair of L representations, as ``(L, L)`` float64.

    ``batches`` yields ``(L, n_b, d)`` tensors: the same n_b examples seen by each of
    the L representations (e.g. the layer outputs of one calibration batch). Each is
    cut into minibatches of ``minibatch`` examples (a tail shorter than 4 is dropped:
    the unbiased estimator needs 4). ``device="cuda"`` moves each minibatch to the GPU
    (from memory, or straight from the memory-mapped activation files) and runs the
    GEMMs there.
    """
    return cka_from_hsic(
        h for feats in batches for h in hsic_minibatches(feats, kernel, minibatch, device)
    )


def hsic_minibatches(
    feats: torch.Tensor,
    kernel: str = "linear",
    minibatch: int = DEFAULT_MINIBATCH,
    device: str | torch.device | None = None,
) -> Iterator[torch.Tensor]:
    """The ``(L, L)`` HSIC of each minibatch of ``feats`` ``(L, n, d)``, on the CPU."""
    for start in range(0, feats.shape[1], minibatch):
        chunk = feats[:, start : start + minibatch]  # (L, m, d)
        if chunk.shape[1] < 4:
            continue
        if device is not None:
            chunk = chunk.to(device, non_blocking=True)
        yield ops.hsic_all_pairs(gram_matrices(chunk, kernel)).cpu()


def cka_from_hsic(hsics: Iterable[torch.Tensor]) -> torch.Tensor:
    """CKA from per-minibatch HSIC matrices, summed in order."""
    total = None
    for hsic in hsics:
        total = hsic if total is None else total + hsic
    if total is None:
        raise MethodError("CKA needs at least 4 examples (tokens); the calibration gave fewer")
    return normalise_hsic(total)


def normalise_hsic(hsic: torch.Tensor) -> torch.Tensor:
    """Summed HSIC ``(L, L)`` -> CKA. A constant representation (zero self-HSIC) gets 0."""
    diag = hsic.diagonal().clamp_min(0)
    denom = torch.sqrt(torch.outer(diag, diag))
    return torch.where(denom > 0, hsic / denom.clamp_min(1e-300), torch.zeros_like(hsic))


def block_influence(boundaries: Iterable[torch.Tensor]) -> torch.Tensor:
    """ShortGPT's Block Influence per layer: ``1 - mean cos(input, output)`` over tokens.

    ``boundaries`` yields ``(L + 1, n, d)`` tensors (``Activations.boundaries()``).
    """
    return 1 - _mean_over_tokens(boundaries, 1, lambda cos: cos)


def angular_distance(boundaries: Iterable[torch.Tensor], span: int) -> torch.Tensor:
    """Gromov et al. (2024): for each start l, ``mean arccos(cos(h_l, h_{l+span})) / pi``.

    ``h_l`` is the input of layer l, so entry l measures how much the block of layers
    ``l .. l+span-1`` changes the hidden state; averaged over all tokens (the paper
    used the last token of each sequence; all tokens give a steadier estimate).
    """
    return _mean_over_tokens(boundaries, span, lambda cos: cos.clamp(-1, 1).acos()) / math.pi


def _mean_over_tokens(boundaries: Iterable[torch.Tensor], span: int, fn) -> torch.Tensor:
    """For each start l, the mean over tokens of ``fn(cos(h_l, h_{l+span}))``, in float64."""
    sums, count = None, 0
    for b in boundaries:
        starts = b.shape[0] - span
        if starts < 1:
            raise MethodError(f"span {span} is longer than the model's {b.shape[0] - 1} layers")
        cos = [
            torch.nn.functional.cosine_similarity(b[i].double(), b[i + span].double(), -1)
            for i in range(starts)
        ]
        values = torch.stack([fn(c).sum() for c in cos])
        sums = values if sums is None else sums + values
        count += b.shape[1]
    return sums / count


def plot_heatmap(matrix: torch.Tensor, path: str | Path, title: str = "CKA") -> Path:
    """Save a layer x layer heatmap (PNG) with layer indices on both axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = matrix.shape[0]
    fig, ax = plt.subplots(figsize=(6.4, 5.4), dpi=120)
    im = ax.imshow(matrix.float().numpy(), origin="lower", cmap="viridis", vmin=0, vmax=1)
    ticks = list(range(0, n, max(1, n // 15)))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
