"""The single-model methods end to end on tiny models: the plans they choose, the recipes
they write, and that what they measured is what the built model computes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import tailorkit as tk
from tailorkit.methods.common import coefficients, combine, fold
from tailorkit.similarity import angular_distance, block_influence, cka_matrix
from tailorkit.trials import keep

LAYERS = 8


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory):
    return tiny_model_factory("llama", num_layers=LAYERS)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def per_layer(model_dir):
    """The parameter fraction of one layer (all layers of the tiny model are alike)."""
    from tailorkit.checkpoint.source import Source
    from tailorkit.methods.common import layer_parameter_counts

    source = Source(str(model_dir))
    return layer_parameter_counts(source)[0] / source.num_parameters()


def _prune(model_dir, tokens, method, **kw):
    return tk.prune(str(model_dir), method=method, calibration=tokens, progress=False, **kw)


def _dropped(recipe: tk.Recipe) -> list[int]:
    kept = {s[1] for layer in recipe.output_layers() for s in layer.sources}
    return sorted(set(range(LAYERS)) - kept)


def _final_states(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens, output_hidden_states=True).hidden_states[-1]


def test_shortgpt_drops_the_lowest_block_influence(model_dir, tokens, per_layer):
    result = _prune(model_dir, tokens, "shortgpt", target_ratio=2.2 * per_layer)
    assert result.plan.num_layers == LAYERS - 2
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        hs = base(input_ids=tokens, output_hidden_states=True).hidden_states
    # hidden_states[-1] is after the final norm; the layer boundary is the last layer's output.
    boundaries = torch.stack([h.reshape(-1, h.shape[-1]) for h in hs[:-1]])
    bi = block_influence([boundaries])  # layers 0..L-2 from HF's own states
    assert result.report["block_influence"][:-1] == pytest.approx(bi.tolist(), rel=1e-4)
    influence = result.report["block_influence"]
    assert _dropped(result.recipe) == sorted(sorted(range(LAYERS), key=influence.__getitem__)[:2])
    assert result.report["removed_parameter_fraction"] == pytest.approx(
        result.plan.removed_parameter_fraction
    )


def test_angular_drops_the_closest_block_and_keeps_the_last_layer(model_dir, tokens, per_layer):
    result = _prune(model_dir, tokens, "angular", target_ratio=3 * per_layer)
    span = LAYERS - result.plan.num_layers
    assert span == 3
    distance = result.report["angular_distance"]
    start = min(range(LAYERS - span), key=distance.__getitem__)
    assert _dropped(result.recipe) == list(range(start, start + span))
    assert LAYERS - 1 not in _dropped(result.recipe)


def test_slm_fuses_windows_and_its_score_is_the_built_models(
    model_dir, tokens, per_layer, tmp_path
):
    result = _prune(model_dir, tokens, "slm", target_ratio=3 * per_layer)
    plan = result.plan
    assert plan.num_layers == LAYERS - 3
    merged = [layer for layer in plan.layers if layer.method != "passthrough"]
    assert merged and all(layer.method == "laco" for layer in merged)
    assert plan.layers[-1].sources == (("base", LAYERS - 1),)  # the last layer is never merged
    windows = result.report["windows"]
    threshold = result.report["settings"]["threshold"]
    assert all(w["similarity"] >= threshold for w in windows)

    # The build computes what the method measured: CKA of the built model's final hidden
    # states against the base's equals the score of the last (lowest) window accepted.
    out = result.save_pretrained(tmp_path / "slm")
    built = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    a, b = _final_states(built, tokens), _final_states(base, tokens)
    pair = torch.stack([a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])])
    cka = cka_matrix([pair])[0, 1]
    assert float(cka) == pytest.approx(windows[-1]["similarity"], abs=1e-5)

    # LaCo fusion, checked tensor by tensor in float64 (norms included).
    fused = merged[0]
    lo, k = fused.sources[0][1], len(fused.sources)
    out_index = plan.layers.index(fused)
    weights = load_file(out / "model.safetensors")
    base_w = load_file(model_dir / "model.safetensors")
    for rest in ("self_attn.q_proj.weight", "input_layernorm.weight", "mlp.down_proj.weight"):
        theta = [base_w[f"model.layers.{lo + j}.{rest}"].double() for j in range(k)]
        want = theta[0] + sum(t - theta[0] for t in theta[1:])
        got = weights[f"model.layers.{out_index}.{rest}"].double()
        assert torch.allclose(got, want, atol=1e-6), rest

    # The output folder has the card's figures and the report.
    assert (out / "cka.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "slm" and len(report["cka"]) == LAYERS
    assert tk.Recipe.load(out / "recipe.yaml") == result.recipe


def test_slm_threshold_mode_and_average_fusion(model_dir, tokens):
    strict = _prune(model_dir, tokens, "slm", threshold=1.0)
    assert strict.plan.num_layers == LAYERS  # nothing is identical to the original
    loose = _prune(model_dir, tokens, "slm", threshold=0.0, fusion="average")
    assert loose.plan.num_layers == 2  # everything below the last layer fuses into one
    assert loose.plan.layers[0].method == "linear"
    assert loose.plan.layers[0].weights == pytest.approx([1 / 7] * 7)
    cosine = _prune(model_dir, tokens, "slm", threshold=0.5, similarity="cosine")
    assert cosine.report["settings"]["similarity"] == "cosine"


def test_slm_bisection_finds_the_largest_threshold(model_dir, tokens, per_layer):
    result = _prune(model_dir, tokens, "slm", target_ratio=2 * per_layer)
    t = result.report["settings"]["threshold"]
    assert result.plan.num_layers == LAYERS - 2
    # A clearly higher threshold no longer reaches the target.
    higher = _prune(model_dir, tokens, "slm", threshold=min(1.0, t + 0.01))
    assert higher.plan.num_layers > LAYERS - 2


def test_laco_folds_with_composed_weights(model_dir, tokens, per_layer):
    result = _prune(model_dir, tokens, "laco", target_ratio=4 * per_layer, fold=3, interval=1)
    assert result.plan.num_layers == LAYERS - 4
    for layer in result.plan.layers:
        assert sum(layer.weights or (1.0,)) == pytest.approx(1.0)
    assert result.report["folds"]


def test_fold_composition_is_laco_of_laco():
    inner = fold((3, 4))  # (2 - 2) theta_3 + theta_4: a 2-fold keeps only the top
    assert coefficients(inner) == {3: 0.0, 4: 1.0} and inner.method == "laco"
    outer = combine(keep(2), [inner, keep(5)])  # (2 - 3) theta_2 + inner + theta_5
    assert coefficients(outer) == {2: -1.0, 4: 1.0, 5: 1.0}
    assert outer.entry()["merge"] == "linear"
    assert fold((2, 3, 4)).entry()["merge"] == "laco"
    assert combine(keep(2), [keep(3), keep(4)]) == fold((2, 3, 4))  # kept layers: a LaCo fold
    # A plan written as a recipe expands back into exactly the layers that were scored.
    plan = [keep(0), keep(1), outer, fold((6, 7), "average"), keep(8)]
    assert tk.Recipe.from_layers({"base": "m"}, plan).output_layers() == plan


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "shortgpt", "target_ratio": 0.01}, r"between 11\.\d+% \(1 layer\) and"),
        ({"method": "shortgpt", "target_ratio": 0.95}, "cannot be reached"),
        ({"method": "slm", "threshold": 1.5}, r"outside \[0, 1\]"),
        ({"method": "slm", "threshold": -2, "similarity": "cosine"}, r"outside \[-1, 1\]"),
        ({"method": "slm"}, "either target_ratio or threshold"),
        ({"method": "slm", "target_ratio": 0.2, "fusion": "max"}, "fusion: Input should be"),
        ({"method": "nope", "target_ratio": 0.2}, "unknown method 'nope'"),
        ({"method": "shortgpt", "target_ratio": 0.2, "colour": 1}, "colour: unknown setting"),
    ],
)
def test_bad_settings_are_clear_errors(model_dir, tokens, kwargs, message):
    method = kwargs.pop("method")
    with pytest.raises(tk.TailorkitError, match=message):
        _prune(model_dir, tokens, method, **kwargs)


def test_angular_distance_report_matches_direct_computation(model_dir, tokens):
    result = _prune(model_dir, tokens, "angular", target_ratio=0.1)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        hs = base(input_ids=tokens, output_hidden_states=True).hidden_states
    boundaries = torch.stack([h.reshape(-1, h.shape[-1]) for h in hs[:-1]])
    direct = angular_distance([boundaries], 1)
    assert result.report["angular_distance"][: LAYERS - 1] == pytest.approx(
        direct.tolist(), abs=1e-5
    )
