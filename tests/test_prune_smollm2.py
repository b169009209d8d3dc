"""`tailorkit prune` and `tailorkit cka` end to end on the real SmolLM2-135M-Instruct,
with the bundled calibration text (kept short so the suite stays quick)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import tailorkit as tk
from tailorkit.cli import main

pytestmark = pytest.mark.slow

FAST = ["--num-windows", "2", "--seq-len", "32", "-q"]


def test_cli_cka_writes_heatmap_and_json(smollm2_path, tmp_path, capsys):
    plot, data = tmp_path / "cka.png", tmp_path / "cka.json"
    assert main(["cka", str(smollm2_path), "--plot", str(plot), "--json", str(data), *FAST]) == 0
    report = json.loads(data.read_text())
    assert report["layers"] == 30 and len(report["cka"]) == 30
    assert all(abs(report["cka"][i][i] - 1) < 1e-6 for i in range(30))
    assert len(report["block_influence"]) == 30
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert "most similar adjacent layers" in capsys.readouterr().out
    # SmolLM2's first position is an attention sink in every window; left out, the middle
    # layers no longer all look alike (with it, adjacent CKA is 1.000 for layers 11-28).
    assert report["sinks_left_out"] and report["sink_tokens"] >= 2
    middle = [report["cka"][i][i + 1] for i in range(11, 28)]
    assert main(["cka", str(smollm2_path), "--json", str(data), "--keep-sinks", *FAST]) == 0
    kept = json.loads(data.read_text())
    assert not kept["sinks_left_out"]
    assert min(kept["cka"][i][i + 1] for i in range(11, 28)) > 0.999 > min(middle)


def test_cli_prune_slm_builds_a_loadable_checkpoint(smollm2_path, tmp_path):
    out = tmp_path / "smol-slm"
    code = main(
        ["prune", "--base", str(smollm2_path), "--method", "slm", "--target-ratio", "0.25"]
        + ["--out", str(out), *FAST]
    )
    assert code == 0
    recipe = tk.Recipe.load(out / "recipe.yaml")
    plan = recipe.plan()
    assert plan.num_layers == 21  # 9 layers of 2.6% each: 23.7% of the parameters
    assert abs(plan.removed_parameter_fraction - 0.237) < 0.01
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 21
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    card = (out / "README.md").read_text()
    assert "tailorkit prune" in card and "cka.png" in card
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "slm" and report["windows"]


def test_cli_prune_writes_a_recipe_and_rejects_an_unreachable_ratio(smollm2_path, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    args = ["prune", "--base", str(smollm2_path), "--method", "shortgpt"]
    assert main([*args, "--target-ratio", "0.1", "--recipe", str(recipe), *FAST]) == 0
    assert tk.Recipe.load(recipe).plan().num_layers == 26
    assert main([*args, "--target-ratio", "0.9", *FAST]) == 2
    err = capsys.readouterr().err
    assert "cannot be reached" in err and "(1 layer)" in err


def test_prune_api_default_base_and_calibration(smollm2_path):
    """`tk.prune()` with no base and no calibration: the built-in model, the bundled text."""
    result = tk.prune(method="angular", target_ratio=0.2, num_windows=2, progress=False)
    assert result.report["calibration"]["source"] == "bundled public-domain text"
    assert result.plan.num_layers == 22
    # The built-in model's card links the Hub model its weights come from.
    card = result.model_card()
    assert card.data.to_dict()["base_model"] == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert "dequantised from the Q4_1 GGUF" in card.text
    ids = torch.tensor([[1, 504, 3458]])
    with torch.no_grad():
        assert result.model(input_ids=ids).logits.shape == (1, 3, 49152)


def test_bridges_lower_the_held_back_error_of_a_real_model(smollm2_path, tmp_path):
    """ShortGPT's plan for SmolLM2, bridged: every bridge fitted lowers the error on the
    held-back calibration windows (else it would be dropped), and the checkpoint written
    carries them and rebuilds to the byte."""
    result = tk.prune(
        str(smollm2_path),
        method="shortgpt",
        target_ratio=0.25,
        num_windows=8,
        seq_len=64,
        progress=False,
        bridge=True,
    )
    fits = result.report["bridges"]
    assert [f["removed"] for f in fits] == [[3, 4], [12, 18], [25, 27]]
    assert all(f["kept"] and f["error"] < 0.95 * f["error_without"] for f in fits)
    assert fits[1]["error"] < 0.85 * fits[1]["error_without"]  # the six-layer gap gains most
    out = result.save_pretrained(tmp_path / "bridged", progress=False)
    again = tk.build(out / "recipe.yaml", tmp_path / "again", progress=False)
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_block_influence_keeps_the_sink_writing_layer(smollm2_path):
    """SmolLM2's layer 11 writes the attention sink's massive activation; only the sink tokens
    show it, so Block Influence counts them by default and ShortGPT keeps layer 11, while
    leaving them out (skip_sinks) drops it (held-out log-perplexity 7.43 against 5.93 at this
    ratio, benchmarks/RESULTS.md)."""
    kwargs = dict(method="shortgpt", target_ratio=0.35, num_windows=8, progress=False)
    default = tk.prune(str(smollm2_path), **kwargs)
    skipped = tk.prune(str(smollm2_path), skip_sinks=True, **kwargs)
    assert 11 not in default.report["dropped_layers"]
    assert 11 in skipped.report["dropped_layers"]
    assert default.report["sinks"]["at_position_0"] == 8  # every window opens with a sink
