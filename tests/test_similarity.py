"""CKA, Block Influence and angular distance against plain float64 implementations,
and activation capture against the model's own forward pass."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import ARCHITECTURES

import tailorkit as tk
from tailorkit import ops
from tailorkit.activations import capture
from tailorkit.checkpoint.source import Source
from tailorkit.forward import DecoderStack, Step
from tailorkit.similarity import (
    angular_distance,
    block_influence,
    cka_matrix,
    gram_matrices,
    plot_heatmap,
)


def _hsic_loop(k: torch.Tensor, m: torch.Tensor) -> float:
    """Song et al. (2012) unbiased HSIC, written out term by term in float64."""
    n = k.shape[0]
    kt = k.double().clone()
    lt = m.double().clone()
    kt.fill_diagonal_(0)
    lt.fill_diagonal_(0)
    ones = torch.ones(n, dtype=torch.float64)
    trace = float(torch.trace(kt @ lt))
    middle = float(ones @ kt @ ones) * float(ones @ lt @ ones) / ((n - 1) * (n - 2))
    last = 2.0 / (n - 2) * float(ones @ kt @ lt @ ones)
    return (trace + middle - last) / (n * (n - 3))


def _cka_loop(batches: list[torch.Tensor], minibatch: int) -> torch.Tensor:
    """Minibatch linear CKA (Nguyen et al. 2021), pair by pair, in float64."""
    n_rep = batches[0].shape[0]
    total = torch.zeros(n_rep, n_rep, dtype=torch.float64)
    for feats in batches:
        for start in range(0, feats.shape[1], minibatch):
            x = feats[:, start : start + minibatch].double()
            if x.shape[1] < 4:
                continue
            grams = [xi @ xi.T for xi in x]  # uncentred: the estimator must not care
            for i in range(n_rep):
                for j in range(n_rep):
                    total[i, j] += _hsic_loop(grams[i], grams[j])
    d = total.diagonal()
    return total / torch.sqrt(torch.outer(d, d))


@pytest.mark.parametrize("n", [4, 7, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hsic_all_pairs_matches_the_term_by_term_formula(n, dtype):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(5, n, 6, generator=g, dtype=torch.float64)
    grams = (x @ x.transpose(1, 2)).to(dtype)
    got = ops.hsic_all_pairs(grams)
    want = torch.tensor([[_hsic_loop(a, b) for b in grams] for a in grams], dtype=torch.float64)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert got.dtype == torch.float64
    assert torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max()))


def test_cka_matrix_equals_the_pairwise_loop_on_random_features():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1, 300, 16, generator=g)
    # Layers that drift from one another, so CKA spans a range of values.
    feats = torch.cat([base + 0.4 * i * torch.randn(1, 300, 16, generator=g) for i in range(6)])
    batches = [feats[:, :150], feats[:, 150:]]  # minibatches of 64, 64 and 22 in each
    got = cka_matrix(batches, minibatch=64)
    want = _cka_loop(batches, 64)
    assert torch.allclose(got, want, atol=1e-5)
    assert float(got.min()) < 0.9  # the layers really differ


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_cka_known_cases(kernel):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 12, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    other = torch.randn(200, 12, generator=g, dtype=torch.float64)
    feats = torch.stack([x, x @ q, 3.5 * x, other]).float()  # itself, rotated, scaled, unrelated
    cka = cka_matrix([feats], kernel=kernel, minibatch=100)
    assert torch.allclose(cka.diagonal(), torch.ones(4, dtype=torch.float64), atol=1e-6)
    assert abs(float(cka[0, 1]) - 1) < 1e-4  # orthogonal transform
    assert abs(float(cka[0, 2]) - 1) < 1e-4  # isotropic scaling
    assert abs(float(cka[0, 3])) < 0.1  # independent data: near 0 (unbiased)
    assert torch.allclose(cka, cka.T)


def test_rbf_gram_uses_the_median_heuristic():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 9, 4, generator=g, dtype=torch.float64)
    gram = gram_matrices(x, "rbf")[0]
    d2 = torch.cdist(x[0], x[0]) ** 2
    sigma2 = torch.median(d2[torch.triu(torch.ones(9, 9, dtype=torch.bool), 1)])
    assert torch.allclose(gram, torch.exp(-d2 / (2 * sigma2)), atol=1e-5)


def test_block_influence_and_angular_distance_match_direct_formulas():
    g = torch.Generator().manual_seed(4)
    b = torch.randn(5, 50, 8, generator=g)  # 4 layers: 5 boundaries, 50 tokens
    bi = block_influence([b[:, :20], b[:, 20:]])
    for i in range(4):
        cos = torch.nn.functional.cosine_similarity(b[i].double(), b[i + 1].double(), dim=-1)
        assert math.isclose(float(bi[i]), float(1 - cos.mean()), rel_tol=1e-9)
    ang = angular_distance([b], 2)
    assert ang.shape == (3,)
    cos = torch.nn.functional.cosine_similarity(b[1].double(), b[3].double(), dim=-1)
    assert math.isclose(float(ang[1]), float(torch.arccos(cos).mean() / math.pi), rel_tol=1e-9)
    with pytest.raises(tk.TailorkitError, match="span 5 is longer"):
        angular_distance([b], 5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_layer_by_layer_run_reproduces_the_model(tiny_model_factory, arch):
    """Recorded states equal the model's hidden states, and replaying the layers one by one
    from a recorded state gives the model's logits exactly, for every architecture."""
    stack = DecoderStack.load(Source(str(tiny_model_factory(arch, num_layers=5))))
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    trace = stack.trace(ids)
    with torch.no_grad():
        out = stack.model(input_ids=ids, output_hidden_states=True)
    for i in range(stack.num_layers):
        assert torch.equal(trace.states[i], out.hidden_states[i]), f"input of layer {i}"
    assert torch.equal(stack.final(trace.states[-1]), out.hidden_states[-1])
    for start in (0, 3):
        steps = [Step(i) for i in range(start, stack.num_layers)]
        assert torch.equal(stack.logits(stack.run(trace.states[start], steps, trace)), out.logits)


def test_activations_offloaded_to_disk_are_mapped_and_equal(tiny_model_factory, tmp_path):
    stack = DecoderStack.load(Source(str(tiny_model_factory("qwen3", num_layers=4))))
    ids = torch.randint(0, 256, (5, 16), generator=torch.Generator().manual_seed(1))
    in_memory = capture(stack, ids, batch_size=2, offload=False, progress=False)
    on_disk = capture(stack, ids, batch_size=2, offload=tmp_path / "acts", progress=False)
    assert not in_memory.offloaded and on_disk.offloaded
    files = sorted((tmp_path / "acts").glob("*.safetensors"))
    assert len(files) == 3  # batches of 2, 2, 1
    for a, b in zip(in_memory.boundaries(), on_disk.boundaries()):
        assert torch.equal(a, b)
    # The states are views of the files, not copies: their memory is a mapping of the file.
    address = on_disk.traces[0].states[2].data_ptr()
    mapped = [line.split() for line in open("/proc/self/maps")]
    owner = [
        m[-1]
        for m in mapped
        if int(m[0].split("-")[0], 16) <= address < int(m[0].split("-")[1], 16)
    ]
    assert owner == [str(files[0])]
    auto = capture(stack, ids, batch_size=5, offload=True, progress=False)
    assert auto.offloaded and len(auto.traces) == 1


def test_nan_in_activations_names_the_layer(tiny_model_factory):
    stack = DecoderStack.load(Source(str(tiny_model_factory("llama", num_layers=4))))
    with torch.no_grad():
        stack.layers[2].mlp.down_proj.weight[0, 0] = float("nan")
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(tk.TailorkitError, match="input of layer 3"):
        capture(stack, ids, progress=False)


def test_heatmap_is_a_png(tmp_path):
    path = plot_heatmap(torch.eye(6, dtype=torch.float64), tmp_path / "cka.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_attention_sinks_are_found_from_the_data_and_left_out():
    """A token whose hidden state is far larger than the rest at some boundary (an attention
    sink) is found wherever it is, and the statistics can leave it out: with it, linear CKA
    sees only the sink; without it, what the other tokens do."""
    from tailorkit.activations import SINK_FACTOR, Activations
    from tailorkit.forward import Trace

    g = torch.Generator().manual_seed(9)
    traces = []
    for b in range(2):
        states = [torch.randn(2, 16, 8, generator=g) for _ in range(4)]  # 3 layers
        for s in states[1:]:
            s[:, 0] += 3 * SINK_FACTOR  # position 0 of each window, from layer 0's output on
        states[2][1, 7] *= 2 * SINK_FACTOR  # and one delimiter-like token mid-window
        traces.append(Trace(torch.zeros(2, 16, dtype=torch.long), states, [{}] * 3))
    acts = Activations(traces)
    sinks = [s.view(2, 16) for s in acts.sinks()]
    for s in sinks:  # both windows' first tokens and the delimiter, nothing else
        assert s[:, 0].all() and s[1, 7] and int(s.sum()) == 3
    kept = next(acts.boundaries(skip_sinks=True))
    assert kept.shape == (4, 32 - 3, 8)
    assert not torch.isin(kept[2], traces[0].states[2][1, 7]).all(-1).any()
    with_sinks, without = cka_matrix(acts.outputs()), cka_matrix(acts.outputs(True))
    assert with_sinks[0, 2] > 0.9 > without[0, 2]  # independent noise, but for the sinks
