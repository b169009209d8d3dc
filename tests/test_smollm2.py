"""Integration on the real SmolLM2-135M-Instruct: the example recipe, 30 -> 22 layers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tailorkit as tk
from tailorkit.cli import main as cli
from tailorkit.generate import generate

EXAMPLE = Path(__file__).parent.parent / "examples" / "smollm2-stitch.yaml"

pytestmark = pytest.mark.slow


def test_example_recipe_builds_loads_and_generates(smollm2_path, tmp_path):
    recipe = tk.Recipe.load(EXAMPLE)
    plan = recipe.plan()
    methods = [layer.method for layer in plan.layers]
    assert plan.base.num_layers == 30 and plan.num_layers == 22
    assert "linear" in methods and "task_arithmetic" in methods
    assert plan.removed_layer_fraction == pytest.approx(8 / 30)
    assert 0.15 < plan.removed_parameter_fraction < plan.removed_layer_fraction  # embeddings stay

    out = tmp_path / "smol-22"
    assert cli(["build", str(EXAMPLE), str(out), "--shard-size", "100MB", "-q"]) == 0
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 22
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == plan.nbytes

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 22
    ids = tokenizer("def fibonacci(n):\n    ", return_tensors="pt").input_ids
    with torch.no_grad():
        built = model(ids).logits
        assembled = tk.assemble(plan)(ids).logits
    assert torch.equal(built, assembled)

    text = generate(model, tokenizer, "The capital of France is", max_new_tokens=12)
    assert len(tokenizer(text).input_ids) >= 6  # it really generated new tokens
