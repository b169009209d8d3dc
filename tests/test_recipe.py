"""The recipe format as RECIPE.md states it: parsing, expansion, strictness, round trips."""

from __future__ import annotations

import pytest

from tailorkit.errors import RecipeError
from tailorkit.recipe import OutputLayer, Recipe

EXAMPLE = """
models:
  base: meta-llama/Llama-2-13b-hf
  chat: WizardLMTeam/WizardLM-13B-V1.2
  math: vanillaOVO/WizardMath-13B-V1.0
base: base
dtype: bfloat16
layers:
  - {from: base, layers: [0, 12]}
  - {from: chat, layer: 12}
  - merge: linear
    sources:
      - {from: chat, layer: 13, weight: 0.6}
      - {from: math, layer: 13, weight: 0.4}
  - merge: task_arithmetic
    base: {from: base, layer: 14}
    sources: [{from: chat, layer: 14}, {from: math, layer: 14}]
    lambda: 0.7
  - merge: ties
    base: {from: base, layer: 15}
    sources: [{from: chat, layer: 15}, {from: math, layer: 15}]
    density: 0.5
    lambda: 1.0
  - merge: slerp
    sources: [{from: chat, layer: 16}, {from: math, layer: 16}]
    t: 0.3
  - merge: laco
    sources: [{from: base, layer: 17}, {from: base, layer: 18}, {from: base, layer: 19}]
embeddings: base
head: base
"""


def _load(tmp_path, text: str, name: str = "r.yaml") -> Recipe:
    path = tmp_path / name
    path.write_text(text)
    return Recipe.load(path)


def test_recipe_md_example_parses_and_expands(tmp_path):
    r = _load(tmp_path, EXAMPLE)
    layers = r.output_layers()
    assert len(layers) == 12 + 6
    assert [lay.method for lay in layers[11:]] == [
        "passthrough",
        "passthrough",
        "linear",
        "task_arithmetic",
        "ties",
        "slerp",
        "laco",
    ]
    assert layers[0].sources == (("base", 0),) and layers[11].sources == (("base", 11),)
    assert layers[12].sources == (("chat", 12),)
    assert layers[13].weights == pytest.approx((0.6, 0.4))
    ta = layers[14]
    assert (
        ta.base == ("base", 14) and dict(ta.params) == {"lambda": 0.7} and ta.weights == (1.0, 1.0)
    )
    assert dict(layers[15].params) == {"lambda": 1.0, "density": 0.5}
    assert dict(layers[16].params) == {"t": 0.3}
    assert layers[17].sources == (("base", 17), ("base", 18), ("base", 19))
    assert r.base_model == "base" and r.embeddings_model == "base" and r.dtype == "bfloat16"


def test_output_layers_written_back_expand_into_themselves(tmp_path):
    """``Recipe.from_layers`` is the inverse of the expansion, for every merge method, and
    output layers are hashable (caches key on them)."""
    r = _load(tmp_path, EXAMPLE)
    layers = r.output_layers()
    weighted = Recipe.from_dict(
        {
            "models": r.models,
            "layers": [
                {
                    "merge": "task_arithmetic",
                    "base": {"from": "base", "layer": 3},
                    "sources": [
                        {"from": "chat", "layer": 3, "weight": 0.5},
                        {"from": "math", "layer": 3},
                    ],
                },
                {
                    "merge": "linear",
                    "sources": [{"from": "chat", "layer": 4}, {"from": "math", "layer": 4}],
                },
            ],
        }
    ).output_layers()
    for plan in (layers, weighted, layers[::-1]):
        again = Recipe.from_layers(r.models, plan, "bfloat16")
        assert again.output_layers() == plan
        assert len({hash(layer) for layer in plan}) == len(set(plan))
    assert Recipe.from_layers(r.models, layers, "bfloat16").layers[0].layers == (0, 12)  # a range
    assert Recipe.identity("x/m", 7).output_layers() == [
        OutputLayer("passthrough", (("base", i),)) for i in range(7)
    ]


def test_linear_weights_are_normalised(tmp_path):
    r = Recipe.from_dict(
        {
            "models": {"a": "x/a", "b": "x/b"},
            "layers": [
                {
                    "merge": "linear",
                    "sources": [{"from": "a", "layer": 0, "weight": 3}, {"from": "b", "layer": 0}],
                }
            ],
        }
    )
    assert r.output_layers()[0].weights == pytest.approx((0.75, 0.25))


def test_yaml_and_json_round_trip(tmp_path):
    r = _load(tmp_path, EXAMPLE)
    again = _load(tmp_path, r.to_yaml(), "again.yaml")
    assert again == r and again.fingerprint() == r.fingerprint()
    as_json = _load(tmp_path, r.to_json(), "again.json")
    assert as_json == r
    assert r.to_yaml().startswith("# tailorkit ")


def test_defaults(tmp_path):
    r = Recipe.from_dict(
        {"models": {"first": "x/a", "second": "x/b"}, "layers": [{"from": "second", "layer": 3}]}
    )
    assert r.base_model == "first" and r.head_model == "first" and r.embeddings_model == "first"
    assert r.dtype is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": "blue"}, "colour: unknown key"),
        ({"layers": []}, "layers: List should have at least 1 item"),
        ({"layers": [{"from": "a", "layer": 0, "extra": 1}]}, "layers.0.extra: unknown key"),
        ({"layers": [{"from": "zz", "layer": 0}]}, "model 'zz' is not in models"),
        ({"layers": [{"from": "a", "layer": -1}]}, "layers.0.layer"),
        ({"layers": [{"from": "a", "layers": [5, 2]}]}, "start < stop"),
        ({"layers": [{"frm": "a"}]}, "a layer entry needs 'merge', 'layers'"),
        ({"dtype": "int8"}, "dtype"),
        ({"base": "nope"}, "base: model 'nope' is not in models"),
        (
            {
                "layers": [
                    {
                        "merge": "linear",
                        "sources": [{"from": "a", "layer": 0, "weight": float("nan")}],
                    }
                ]
            },
            "weight must be a finite number",
        ),
        (
            {"layers": [{"merge": "task_arithmetic", "sources": [{"from": "a", "layer": 0}]}]},
            "needs a 'base' layer",
        ),
        (
            {
                "layers": [
                    {
                        "merge": "task_arithmetic",
                        "base": {"from": "a", "layer": 0},
                        "sources": [{"from": "a", "layer": 1}],
                        "lambda": float("inf"),
                    }
                ]
            },
            "lambda must be a finite number",
        ),
        (
            {"layers": [{"merge": "slerp", "sources": [{"from": "a", "layer": 0}]}]},
            "exactly 2 source",
        ),
        (
            {"layers": [{"merge": "linear", "t": 0.5, "sources": [{"from": "a", "layer": 0}]}]},
            "field 't' is not used by merge 'linear'",
        ),
        (
            {
                "layers": [
                    {
                        "merge": "ties",
                        "base": {"from": "a", "layer": 0},
                        "density": 0,
                        "sources": [{"from": "a", "layer": 1}],
                    }
                ]
            },
            "density",
        ),
        ({"layers": [{"merge": "mean", "sources": [{"from": "a", "layer": 0}]}]}, "merge"),
        (
            {
                "layers": [
                    {
                        "merge": "linear",
                        "sources": [
                            {"from": "a", "layer": 0, "weight": 1},
                            {"from": "a", "layer": 1, "weight": -1},
                        ],
                    }
                ]
            },
            "sum to 0",
        ),
    ],
)
def test_bad_recipes_name_the_field(change, message):
    data = {"models": {"a": "org/a"}, "layers": [{"from": "a", "layer": 0}], **change}
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict(data)


def test_not_a_mapping_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="is a mapping"):
        _load(tmp_path, "- just\n- a list\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        _load(tmp_path, "models: {a: [}\n")
    with pytest.raises(RecipeError, match="cannot read"):
        Recipe.load(tmp_path / "missing.yaml")
