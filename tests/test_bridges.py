"""Linear bridges: the fit, the fold, the recipe's fitted tensors, and their errors, end to
end on tiny models of every architecture that takes one."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import tailorkit as tk
from tailorkit import bridges
from tailorkit.bridges import _Stats
from tailorkit.cli import main
from tailorkit.trials import RunnerConfig, TrialRunner

LAYERS = 6
# Layer 2 passes through, 3 and 4 are removed, 5 follows: one gap, bridged after layer 2.
PLAN = [{"from": "base", "layers": [0, 3]}, {"from": "base", "layer": 5}]
FOLDED = {arch: "mlp.down_proj" for arch in ("llama", "mistral", "qwen2", "qwen3", "phi3")}
FOLDED["gpt2"] = "mlp.c_proj"


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(7))


def _recipe(path, plan=PLAN) -> tk.Recipe:
    return tk.Recipe.from_dict({"models": {"base": str(path)}, "layers": plan})


def test_the_fit_solves_its_weighted_least_squares_exactly():
    """Synthetic statistics: with no noise and a vanishing ridge the true map comes back,
    and the error the statistics give is the direct weighted residual."""
    g = torch.Generator().manual_seed(0)
    d, n = 8, 400
    m = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, d, generator=g, dtype=torch.float64)
    true = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, generator=g).double()
    h = y + m @ true
    stats = _Stats(d)
    stats.add(m[:200], y[:200], h[:200])
    stats.add(m[200:], y[200:], h[200:])  # accumulated over batches
    t = stats.solve(1e-12, "test")
    assert torch.allclose(t, true, atol=1e-8)
    other = true + 0.01 * torch.randn(d, d, generator=g).double()
    w = 1 / h.norm(dim=-1)
    direct = (w * (h - y - m @ other).square().sum(-1)).sum() / (w * h.square().sum(-1)).sum()
    assert stats.error(other) == pytest.approx(float(direct.sqrt()), rel=1e-9)
    # The ridge pulls towards the identity (no bridge), not towards zero.
    assert torch.allclose(stats.solve(1e9, "test"), torch.eye(d, dtype=torch.float64), atol=1e-6)
    bad = _Stats(d)
    bad.add(m, y, h * float("nan"))
    with pytest.raises(tk.TailorkitError, match="NaN or inf"):
        bad.solve(0.1, "bridge after output layer 2")
    silent = _Stats(d)
    silent.add(torch.zeros(n, d, dtype=torch.float64), y, h)  # the MLP wrote nothing
    with pytest.raises(tk.TailorkitError, match="singular"):
        silent.solve(0.1, "bridge after output layer 2")


@pytest.mark.parametrize("arch", sorted(FOLDED))
def test_bridged_model_is_built_as_scored_and_rebuilt_byte_for_byte(
    arch, tiny_model_factory, tokens, tmp_path
):
    path = tiny_model_factory(arch, num_layers=LAYERS)
    recipe = _recipe(path)
    runner = TrialRunner(RunnerConfig(str(path), tokens, batch_size=4, state_cache_bytes=0))
    bridged, fits = bridges.fit_bridges(runner, recipe, ridges=(1e-3,), progress=False)
    (fit,) = fits
    assert (fit.layer, fit.removed, fit.name) == (2, (3, 5), "bridge.2")
    assert fit.tokens + fit.held_back_tokens == tokens.numel() and fit.held_back_tokens > 0
    if not fit.kept:  # a random tiny model may not gain; keep it to test the fold
        bridged = recipe.with_layers(
            [*recipe.output_layers()[:2], _with_bridge(recipe, 2), recipe.output_layers()[3]],
            {"bridge.2": runner.fitted.get("bridge.2", torch.eye(64) * 1.1)},
        )
    layers = bridged.output_layers()
    assert [layer.bridge for layer in layers] == [None, None, "bridge.2", None]

    out = tk.build(bridged, tmp_path / "built", progress=False)
    t = tk.Recipe.load(out / "recipe.yaml").fitted()["bridge.2"].double()
    built = load_file(out / "model.safetensors")
    source = load_file(path / "model.safetensors")
    prefix = "transformer.h" if arch == "gpt2" else "model.layers"
    w0 = source[f"{prefix}.2.{FOLDED[arch]}.weight"].double()
    w = built[f"{prefix}.2.{FOLDED[arch]}.weight"].double()
    want = w0 @ t if arch == "gpt2" else t.T @ w0  # Conv1D is (in, out); Linear (out, in)
    assert torch.allclose(w, want, atol=1e-6)
    if arch == "gpt2":
        b0, b = (x[f"{prefix}.2.mlp.c_proj.bias"].double() for x in (source, built))
        assert torch.allclose(b, b0 @ t, atol=1e-6)
    # What the runner scores is what transformers loads from the built folder.
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    runner.add_fitted(bridged.fitted())
    with torch.no_grad():
        assert torch.allclose(
            torch.cat(runner.logits(layers)), model(input_ids=tokens).logits, atol=1e-5
        )
        assert torch.equal(
            tk.assemble(out / "recipe.yaml")(input_ids=tokens).logits,
            tk.assemble(bridged)(input_ids=tokens).logits,
        )
    # The folder rebuilds itself, to the byte.
    again = tk.build(out / "recipe.yaml", tmp_path / "again", progress=False)
    for name in ("model.safetensors", "recipe.safetensors"):
        assert (again / name).read_bytes() == (out / name).read_bytes()
    assert tk.Recipe.load(again / "recipe.yaml") == tk.Recipe.load(out / "recipe.yaml")


def _with_bridge(recipe, index):
    from dataclasses import replace

    return replace(recipe.output_layers()[index], bridge="bridge.2")


def test_the_reported_error_is_the_bridged_models_own(tiny_model_factory, tokens):
    """The held-back error the fit reports (from its statistics) is what the bridged layer's
    output, run again, gives on the held-back windows against the dense states."""
    path = tiny_model_factory("llama", num_layers=LAYERS)
    runner = TrialRunner(RunnerConfig(str(path), tokens, batch_size=4, state_cache_bytes=0))
    bridged, (fit,) = bridges.fit_bridges(runner, _recipe(path), ridges=(1e-2,), progress=False)
    t = bridged.fitted().get("bridge.2") if fit.kept else None
    if t is not None:
        runner.add_fitted({"bridge.2": t})
    layers = bridged.output_layers()[:3]
    num, den = 0.0, 0.0
    for b, trace in enumerate(runner.traces):
        out = runner.final_state(tuple(layers), b).reshape(-1, 64).double()
        h = trace.states[5].reshape(-1, 64).double()
        held = torch.arange(4).add(4 * b).remainder(4).eq(3).repeat_interleave(24)
        w = 1 / h[held].norm(dim=-1)
        num += float((w * (h[held] - out[held]).square().sum(-1)).sum())
        den += float((w * h[held].square().sum(-1)).sum())
    got = (num / den) ** 0.5
    assert got == pytest.approx(fit.error if fit.kept else fit.error_without, rel=1e-4)


def test_cli_prune_bridge_and_bridge_command(tiny_model_factory, tokens, tmp_path, capsys):
    path = tiny_model_factory("llama", num_layers=LAYERS)
    text = tmp_path / "text.txt"
    text.write_text("So foul and fair a day I have not seen. " * 400)
    recipe = tmp_path / "hand.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "models": {"m": str(path)},
                "base": "m",
                "layers": [
                    {"from": "m", "layers": [0, 2]},
                    {"from": "m", "layer": 4},
                    {"from": "m", "layer": 5},
                ],
            }
        )
    )
    calib = ["--calibration", str(text), "--seq-len", "16", "--num-windows", "8", "-q"]
    assert main(["bridge", str(recipe), "--out", str(tmp_path / "b"), *calib]) == 0
    err = capsys.readouterr().err
    assert "for base layers 2-3" in err
    out = tmp_path / "b"
    built = tk.Recipe.load(out / "recipe.yaml")
    assert built.base == "m" and (out / "recipe.safetensors").is_file()
    report = json.loads((out / "report.json").read_text())
    assert [f["removed"] for f in report["bridges"]] == [[2, 4]]
    card = (out / "README.md").read_text()
    assert "## Bridges" in card and "arXiv:2505.02819" in card
    assert hashlib.sha256((out / "recipe.safetensors").read_bytes()).hexdigest() == (
        built.tensors.sha256
    )
    # prune --bridge writes the recipe and its tensors file where --recipe says
    args = ["prune", "--base", str(path), "--method", "shortgpt", "--target-ratio", "0.3"]
    assert main([*args, "--bridge", "--recipe", str(tmp_path / "r.yaml"), *calib]) == 0
    again = tk.Recipe.load(tmp_path / "r.yaml")
    assert again.tensors.file == "recipe.safetensors" and again.plan().num_layers < LAYERS
    # without --out or --recipe there is nowhere to put the tensors
    assert main([*args, "--bridge", *calib]) == 2
    assert "fitted tensors" in capsys.readouterr().err
    if not torch.cuda.is_available():  # a device that is not there: refused before any work
        assert main(["bridge", str(recipe), "--device", "cuda", *calib]) == 2
        assert "cuda" in capsys.readouterr().err


def test_gptailor_plans_are_bridged_on_their_own_candidates(family, tokens):
    result = tk.prune(
        str(family.base),
        method="gptailor",
        candidates=[str(c) for c in family.candidates],
        target_ratio=0.22,
        calibration=tokens,
        batch_size=4,
        progress=False,
        bridge=True,
        budget=6,
        popsize=6,
    )
    (fit,) = result.report["bridges"]  # 4 layers, one removed
    assert set(result.recipe.models) == {"base", "c1", "c2"} and fit["tokens"] > 0
    assert result.plan.num_layers == 3


def test_bad_fitted_tensors_are_clear_errors_and_nothing_is_written(
    tiny_model_factory, tokens, tmp_path
):
    from dataclasses import replace

    path = tiny_model_factory("llama", num_layers=LAYERS)
    layers = _recipe(path).output_layers()

    layers[2] = replace(layers[2], bridge="bridge.2")
    good = _recipe(path).with_layers(layers, {"bridge.2": torch.eye(64) * 1.01})
    folder = tmp_path / "r"
    folder.mkdir()
    good.save(folder / "recipe.yaml")

    def load_and_build(name):
        with pytest.raises(tk.TailorkitError) as info:
            tk.build(tk.Recipe.load(folder / "recipe.yaml"), tmp_path / name, progress=False)
        assert not (tmp_path / name).exists()
        return str(info.value)

    # the file changed after the recipe was written
    data = bytearray((folder / "recipe.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "recipe.safetensors").write_bytes(bytes(data))
    assert "tensors: " in load_and_build("a") and "sha256" in load_and_build("a")
    # a name the file does not hold; a tensor of the wrong shape; NaN in a bridge
    for tensors, message in (
        ({"other": torch.eye(64)}, "bridge 'bridge.2' is not among the recipe's fitted"),
        ({"bridge.2": torch.eye(32)}, r"must be a floating-point \(64, 64\) matrix"),
        ({"bridge.2": torch.full((64, 64), float("nan"))}, "non-finite"),
    ):
        r = good.with_fitted(tensors)
        r.save(folder / "recipe.yaml")
        assert message.split(" ")[0] in load_and_build("b")
        with pytest.raises(tk.TailorkitError, match=message):
            tk.build(tk.Recipe.load(folder / "recipe.yaml"), tmp_path / "c", progress=False)
    # a bridge on a range, a bridge with no tensors file, a file outside the folder
    for data, message in (
        ({"from": "base", "layers": [0, 3], "bridge": "x"}, "not a range"),
        ({"from": "base", "layer": 0, "bridge": "x"}, "has no tensors file"),
    ):
        with pytest.raises(tk.RecipeError, match=message):
            tk.Recipe.from_dict({"models": {"base": str(path)}, "layers": [data]})
    with pytest.raises(tk.RecipeError, match="inside the recipe's folder"):
        tk.Recipe.from_dict(
            {
                "models": {"base": str(path)},
                "tensors": {"file": "../../etc/x.safetensors", "sha256": "0" * 64},
                "layers": [{"from": "base", "layer": 0}],
            }
        )


def test_gemma_layers_take_no_bridge(tiny_model_factory, tokens):
    path = tiny_model_factory("gemma2", num_layers=LAYERS)
    runner = TrialRunner(RunnerConfig(str(path), tokens, batch_size=4, state_cache_bytes=0))
    with pytest.raises(tk.TailorkitError, match="post-feedforward norm"):
        bridges.fit_bridges(runner, _recipe(path), progress=False)
