"""Width pruning: kept MLP channels in the recipe, gathered by the build and the runner
alike, chosen by importance, split against depth; end to end on tiny models of every
architecture, and the errors of bad widths."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import tailorkit as tk
from tailorkit import combine, width
from tailorkit.cli import main
from tailorkit.recipe import Channels
from tailorkit.trials import RunnerConfig, TrialRunner

LAYERS = 6
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2"]
# name inside a layer -> axis of its MLP channels, per layout
GATHERED = {
    "llama": {"mlp.up_proj.weight": 0, "mlp.gate_proj.weight": 0, "mlp.down_proj.weight": 1},
    "phi3": {"mlp.down_proj.weight": 1},
    "gpt2": {"mlp.c_fc.weight": 1, "mlp.c_fc.bias": 0, "mlp.c_proj.weight": 0},
}


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(7))


def _shortgpt(path, tokens, ratio: float, share, **kwargs) -> tk.PruneResult:
    """ShortGPT at ``ratio`` with ``share`` of it as width, on the tiny token windows."""
    return tk.prune(
        path,
        method="shortgpt",
        target_ratio=ratio,
        width_share=share,
        calibration=tokens,
        batch_size=4,
        progress=False,
        **kwargs,
    )


def _prefix(arch: str) -> str:
    return "transformer.h" if arch == "gpt2" else "model.layers"


def _size(model) -> int:
    config = model.config
    return config.n_inner if config.model_type == "gpt2" else config.intermediate_size


@pytest.mark.parametrize("arch", ARCHS)
def test_width_pruned_model_is_built_as_scored_and_rebuilt_byte_for_byte(
    arch, tiny_model_factory, tokens, tmp_path
):
    path = tiny_model_factory(arch, num_layers=LAYERS)
    result = _shortgpt(path, tokens, 0.3, 0.5)
    recipe = result.recipe
    report = result.report["width"]
    keep = report["intermediate_size"]
    assert recipe.width.intermediate_size == keep < report["base_intermediate_size"] == 128
    plan = recipe.plan()
    assert plan.num_layers == LAYERS - 1  # half the budget went to depth: one layer
    assert abs(plan.removed_parameter_fraction - 0.3) < 0.03

    out = tk.build(recipe, tmp_path / "built", progress=False)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert _size(model) == keep
    # The built tensors are the source's kept rows and columns.
    built, source = load_file(out / "model.safetensors"), load_file(path / "model.safetensors")
    layers = recipe.output_layers()
    p = _prefix(arch)
    for j, layer in enumerate(layers):
        depth = layer.first[1]
        for name, axis in GATHERED.get(arch, GATHERED["llama"]).items():
            want = source[f"{p}.{depth}.{name}"].index_select(axis, layer.channels.index)
            assert torch.equal(built[f"{p}.{j}.{name}"], want), (j, name)
    if arch == "phi3":  # gate and up stacked: the channels are kept in both halves
        fused = source[f"{p}.{layers[0].first[1]}.mlp.gate_up_proj.weight"]
        index = layers[0].channels.index
        want = torch.cat([fused[index], fused[index + 128]])
        assert torch.equal(built[f"{p}.0.mlp.gate_up_proj.weight"], want)
    # What the runner scores is what transformers loads; assemble gives the same.
    runner = TrialRunner(RunnerConfig(str(path), tokens, batch_size=4, state_cache_bytes=0))
    with torch.no_grad():
        got = model(input_ids=tokens).logits
        assert torch.allclose(torch.cat(runner.logits(layers)), got, atol=1e-5)
        assert torch.equal(tk.assemble(out / "recipe.yaml")(input_ids=tokens).logits, got)
    again = tk.build(out / "recipe.yaml", tmp_path / "again", progress=False)
    for name in ("model.safetensors", "recipe.safetensors", "config.json"):
        assert (again / name).read_bytes() == (out / name).read_bytes()


def test_merges_gather_in_chunks_as_a_whole_merge_would(tiny_model_factory, tmp_path, monkeypatch):
    """Every merge method with kept channels, streamed a few rows at a time, gives the
    whole merge's kept rows and columns (slerp's and TIES's whole-tensor statistics
    included), and the bridge fold composes with the gather."""
    base = tiny_model_factory("llama")
    a = tiny_model_factory("llama", variant="a")
    b = tiny_model_factory("llama", variant="b")
    keep = torch.tensor(
        sorted(torch.randperm(128, generator=torch.Generator().manual_seed(1))[:40])
    )
    index = torch.stack([keep, keep.flip(0).sort().values, keep, keep]).int()
    bridge = torch.eye(64) + 0.01 * torch.randn(64, 64, generator=torch.Generator().manual_seed(2))
    ref = {"from": "a", "layer": 1}
    plan = [
        {"merge": "linear", "sources": [{"from": "a", "layer": 0}, {"from": "b", "layer": 0}]},
        {"merge": "slerp", "sources": [ref, {"from": "b", "layer": 1}], "t": 0.3},
        {
            "merge": "ties",
            "sources": [{"from": "a", "layer": 2}, {"from": "b", "layer": 2}],
            "base": {"from": "base", "layer": 2},
            "density": 0.5,
        },
        {"from": "base", "layer": 3, "bridge": "bridge.3"},
    ]
    recipe = tk.Recipe.from_dict(
        {
            "models": {"base": str(base), "a": str(a), "b": str(b)},
            "tensors": {"file": "recipe.safetensors", "sha256": "0" * 64},
            "width": {"intermediate_size": 40, "channels": "width.mlp"},
            "layers": plan,
        }
    ).with_fitted({"width.mlp": index, "bridge.3": bridge})
    monkeypatch.setattr(combine, "CHUNK_ELEMENTS", 100)  # a few rows per chunk
    out = tk.build(recipe, tmp_path / "built", progress=False)
    built = load_file(out / "model.safetensors")
    plain = recipe.model_copy(update={"width": None, "tensors": None})
    plain = tk.Recipe.from_dict(
        {**plain.to_dict(), "layers": plan[:3] + [{"from": "base", "layer": 3}]}
    )
    full = {job.name: job.compute() for job in plain.plan().jobs}
    for j in range(3):
        for name, axis in GATHERED["llama"].items():
            key = f"model.layers.{j}.{name}"
            want = full[key].index_select(axis, index[j].long())
            assert torch.equal(built[key], want), key
    down = full["model.layers.3.mlp.down_proj.weight"].double()
    want = (bridge.double().T @ down.index_select(1, keep)).float()
    assert torch.equal(built["model.layers.3.mlp.down_proj.weight"], want)


def test_importance_keeps_the_active_channels_and_drops_silent_ones(
    tiny_model_factory, tokens, tmp_path
):
    """Channels whose up-projection row is zero never activate (a_j = act(gate) * up = 0):
    importance ranks them last, so a width that can do without them never keeps them, and
    the model computes exactly what it did."""
    path = tiny_model_factory("llama", num_layers=LAYERS)
    silent = tmp_path / "silent"
    silent.mkdir()
    for f in path.iterdir():
        if f.name != "model.safetensors":
            (silent / f.name).write_bytes(f.read_bytes())
    tensors = load_file(path / "model.safetensors")
    dead = torch.arange(0, 128, 2)  # every even channel of every layer stays at zero
    for i in range(LAYERS):
        tensors[f"model.layers.{i}.mlp.up_proj.weight"][dead] = 0
    save_file(tensors, silent / "model.safetensors", metadata={"format": "pt"})
    runner = TrialRunner(RunnerConfig(str(silent), tokens, batch_size=4, state_cache_bytes=0))
    layers = [tk.trials.keep(i) for i in range(LAYERS)]
    scores = width.channel_importance(runner, layers, progress=False)
    for score in scores:
        assert (score[dead] == 0).all() and (score[1::2] > 0).all()
    kept = width.with_width(runner, layers, 64, progress=False)
    for layer in kept:
        assert torch.equal(layer.channels.index, torch.arange(1, 128, 2))
    with torch.no_grad():
        assert torch.allclose(
            torch.cat(runner.logits(kept)), torch.cat(runner.logits(layers)), atol=1e-5
        )


def test_auto_split_keeps_the_split_with_the_lowest_kl(tiny_model_factory, tokens):
    path = tiny_model_factory("llama", num_layers=LAYERS)
    result = _shortgpt(path, tokens, 0.3, "auto")
    report = result.report["width"]
    splits = report["splits"]
    assert [s["share"] for s in splits] == list(width.SPLITS)
    best = min(splits, key=lambda s: s["kl"])
    assert report["share"] == best["share"]
    assert result.recipe.plan().num_layers == best["layers"]
    # Each split's KL is the runner's score of its recipe, not a stand-in.
    runner = TrialRunner(RunnerConfig(str(path), tokens, batch_size=4, state_cache_bytes=0))
    fit, held = width.held_back(len(runner.traces))
    assert held == report["scored_on_batches"] == [1] and fit == [0]
    # The splits are scored on a held-back batch, with channels chosen on the others...
    fixed = [("base", i) for i in range(LAYERS)]
    chosen = [layer for layer in result.recipe.output_layers()]
    layers = [replace(layer, channels=None) for layer in chosen]
    assert {layer.first for layer in layers} <= set(fixed)
    narrow = width.with_width(runner, layers, report["intermediate_size"], False, fit)
    assert runner.score(narrow, tk.objectives.Logits(), batches=held) == pytest.approx(best["kl"])
    # ...and the chosen one keeps the channels that all the windows rank highest: the same
    # model as asking for its share outright.
    again = _shortgpt(path, tokens, 0.3, report["share"])
    assert again.recipe == result.recipe


def test_width_and_bridges_compose(tiny_model_factory, tokens, tmp_path):
    """Bridges are fitted on the width-pruned model; the fold and the gather both land in
    the down projection, and the built model computes what the runner scored."""
    path = tiny_model_factory("llama", num_layers=LAYERS)
    result = _shortgpt(path, tokens, 0.35, 0.5, bridge=True)
    assert result.recipe.width is not None and len(result.report["bridges"]) >= 1
    # A gap in the middle, and a bridge on the layer before it whatever the fit decided.
    plan = [{"from": "base", "layers": [0, 3]}, {"from": "base", "layers": [4, 6]}]
    recipe = tk.Recipe.from_dict({"models": {"base": str(path)}, "layers": plan})
    runner = TrialRunner(RunnerConfig(str(path), tokens, batch_size=4, state_cache_bytes=0))
    layers = width.with_width(runner, recipe.output_layers(), 48, progress=False)
    bridge = torch.eye(64) + 0.05 * torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    layers[2] = replace(layers[2], bridge="bridge.2")
    recipe = recipe.with_layers(layers, {"bridge.2": bridge})
    assert recipe.width.intermediate_size == 48
    out = tk.PruneResult(recipe).save_pretrained(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    runner.add_fitted({"bridge.2": bridge})
    with torch.no_grad():
        got = model(input_ids=tokens).logits
        assert torch.allclose(torch.cat(runner.logits(layers)), got, atol=1e-5)
    card = (out / "README.md").read_text()
    assert "MLP channels" in card


def _width_recipe(tmp_path, path, index: torch.Tensor, size: int | None = None) -> tk.Recipe:
    recipe = tk.Recipe.from_dict(
        {
            "models": {"base": str(path)},
            "tensors": {"file": "recipe.safetensors", "sha256": "0" * 64},
            "width": {"intermediate_size": size or index.shape[1], "channels": "width.mlp"},
            "layers": [{"from": "base", "layers": [0, 4]}],
        }
    ).with_fitted({"width.mlp": index})
    folder = tmp_path / "recipe"
    folder.mkdir(exist_ok=True)
    recipe.save(folder / "recipe.yaml")
    return tk.Recipe.load(folder / "recipe.yaml")


@pytest.mark.parametrize(
    "index, size, message",
    [
        (torch.arange(200).repeat(4, 1), None, "width.intermediate_size: 200 is more than the 128"),
        (torch.tensor([[0, 5, 5, 9]] * 4), None, "channel 5 after 5; each row must be strictly"),
        (torch.tensor([[0, 5, 3, 9]] * 4), None, "channel 3 after 5"),
        (torch.tensor([[0, 5, 9, 128]] * 4), None, "keeps channel 128, but its MLP has 128"),
        (torch.tensor([[-1, 5, 9, 12]] * 4), None, "negative channel index"),
        (torch.arange(8).repeat(3, 1), None, "shape \\[3, 8\\]; it must be int32 of shape \\[4"),
        (torch.arange(8).repeat(4, 1).float(), None, "torch.float32"),
        (torch.arange(8).repeat(4, 1), 6, "shape \\[4, 8\\]; it must be int32 of shape \\[4, 6\\]"),
    ],
)
def test_bad_widths_are_clear_errors_and_nothing_is_written(
    tiny_model_factory, tmp_path, index, size, message
):
    path = tiny_model_factory("llama")
    recipe = _width_recipe(
        tmp_path, path, index.int() if index.dtype == torch.int64 else index, size
    )
    with pytest.raises(tk.TailorkitError, match=message):
        tk.build(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert main(["build", str(recipe.folder / "recipe.yaml"), str(tmp_path / "cli")]) == 2
    assert not (tmp_path / "cli").exists()


def test_width_without_a_tensors_file_and_unexpressible_architectures(tiny_model_factory, tmp_path):
    path = tiny_model_factory("llama")
    with pytest.raises(tk.TailorkitError, match="width.channels: 'width.mlp' names a fitted"):
        tk.Recipe.from_dict(
            {
                "models": {"base": str(path)},
                "width": {"intermediate_size": 8, "channels": "width.mlp"},
                "layers": [{"from": "base", "layers": [0, 4]}],
            }
        )
    moe = tmp_path / "moe"
    moe.mkdir()
    for f in path.iterdir():
        (moe / f.name).write_bytes(f.read_bytes())
    config = json.loads((moe / "config.json").read_text())
    (moe / "config.json").write_text(json.dumps(config | {"num_local_experts": 8}))
    recipe = _width_recipe(tmp_path, moe, torch.arange(8).repeat(4, 1).int())
    with pytest.raises(tk.TailorkitError, match="num_local_experts: a mixture of experts"):
        recipe.plan()
    lists = tmp_path / "lists"
    lists.mkdir()
    for f in path.iterdir():
        (lists / f.name).write_bytes(f.read_bytes())
    (lists / "config.json").write_text(json.dumps(config | {"intermediate_size": [128] * 4}))
    recipe = _width_recipe(tmp_path, lists, torch.arange(8).repeat(4, 1).int())
    with pytest.raises(tk.TailorkitError, match="intermediate_size per layer"):
        recipe.plan()


def test_layers_that_keep_different_numbers_of_channels_are_refused(tiny_model_factory):
    path = tiny_model_factory("llama")
    layers = [
        tk.trials.keep(i).__class__("passthrough", (("base", i),), channels=Channels.of(c))
        for i, c in enumerate([torch.arange(8), torch.arange(8), torch.arange(9), torch.arange(8)])
    ]
    with pytest.raises(tk.TailorkitError, match="same number of MLP channels"):
        tk.Recipe.from_layers({"base": str(path)}, layers)


def test_width_share_errors_before_any_model_is_loaded(tmp_path):
    missing = tmp_path / "not-a-model"
    with pytest.raises(tk.TailorkitError, match="give target_ratio"):
        tk.prune(missing, method="slm", threshold=0.9, width_share=0.5)
    with pytest.raises(tk.TailorkitError, match="width_share must be a number in \\[0, 1\\]"):
        tk.prune(missing, method="shortgpt", target_ratio=0.2, width_share=1.5)
    with pytest.raises(SystemExit):
        main(["prune", "--base", str(missing), "--method", "shortgpt", "--width-share", "2"])


def test_auto_split_writes_report_recipe_and_card(tiny_model_factory, tokens, tmp_path):
    path = tiny_model_factory("llama", num_layers=LAYERS)
    result = _shortgpt(path, tokens, 0.3, "auto")
    out = result.save_pretrained(tmp_path / "out")
    report = json.loads((out / "report.json").read_text())
    assert report["width"]["splits"] and "kl" in report["width"]["splits"][0]
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    if report["width"]["share"] > 0:
        assert recipe["width"]["intermediate_size"] == report["width"]["intermediate_size"]
    card = (out / "README.md").read_text()
    assert "width" in card.lower()


def test_cli_prune_width_share(tiny_model_factory, tmp_path, capsys):
    path = tiny_model_factory("llama", num_layers=LAYERS)
    text = tmp_path / "text.txt"
    text.write_text("So foul and fair a day I have not seen. " * 400)
    calib = ["--calibration", str(text), "--seq-len", "16", "--num-windows", "16", "-q"]
    args = ["prune", "--base", str(path), "--method", "shortgpt", "--target-ratio", "0.3"]
    out = tmp_path / "out"
    assert main([*args, "--width-share", "auto", "--out", str(out), *calib]) == 0
    err = capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert "(chosen)" in err and err.count("width share ") == len(width.SPLITS)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    if report["width"]["share"] > 0:
        assert f"keeps {model.config.intermediate_size} of its 128 MLP channels" in err
        assert "MLP channels per layer" in (out / "README.md").read_text()
    # A fixed share; without --out or --recipe the kept channels have nowhere to go.
    assert main([*args, "--width-share", "1", *calib]) == 2
    assert "kept channels" in capsys.readouterr().err
    assert main([*args, "--width-share", "1", "--recipe", str(tmp_path / "r.yaml"), *calib]) == 0
    recipe = tk.Recipe.load(tmp_path / "r.yaml")
    assert recipe.width is not None and recipe.plan().num_layers == LAYERS
    # Bad shares are refused by the parser, a share without a ratio before any work.
    with pytest.raises(SystemExit):
        main([*args, "--width-share", "half", *calib])
    no_ratio = ["prune", "--base", str(path), "--method", "slm", "--threshold", "0.9"]
    assert main([*no_ratio, "--width-share", "0.5", *calib]) == 2
    assert "give target_ratio" in capsys.readouterr().err


def test_computed_layers_are_cached_within_a_byte_budget(tiny_model_factory, tokens):
    """A width split computes every layer's parameters; the runner keeps them up to its
    byte budget (mapped passthrough tensors cost nothing), recomputing what it dropped."""
    path = tiny_model_factory("llama", num_layers=LAYERS)
    layers = [tk.trials.keep(i) for i in range(LAYERS)]
    config = dict(batch_size=4, state_cache_bytes=0)
    roomy = TrialRunner(RunnerConfig(str(path), tokens, **config))
    narrow = width.with_width(roomy, layers, 48, progress=False)
    per_layer = 3 * 64 * 48 * 4  # gate, up and down kept columns, float32
    tight = TrialRunner(RunnerConfig(str(path), tokens, layer_cache_bytes=2 * per_layer, **config))
    for runner in (roomy, tight):
        first = torch.cat(runner.logits(narrow))
        assert torch.equal(torch.cat(runner.logits(narrow)), first)
    assert roomy.stats.merged_layers == LAYERS and roomy._steps.used == LAYERS * per_layer
    # Two batches, two passes: every layer recomputed every time it is needed.
    assert tight.stats.merged_layers == 2 * 2 * LAYERS and tight._steps.used <= 2 * per_layer


def test_auto_split_with_bridges_scores_each_split_bridged(tiny_model_factory, tokens):
    """With bridges asked, a split is scored as it would ship: bridged, its bridges fitted
    on the batches its KL is not taken on. Depth alone (share 0) is checked by hand."""
    from tailorkit import bridges

    path = tiny_model_factory("llama", num_layers=LAYERS)
    result = _shortgpt(path, tokens, 0.3, "auto", bridge=True)
    splits = result.report["width"]["splits"]
    depth_only = _shortgpt(path, tokens, 0.3, 0.0).recipe
    runner = TrialRunner(RunnerConfig(str(path), tokens, batch_size=4, state_cache_bytes=0))
    fit, held = width.held_back(len(runner.traces))
    bridged, fits = bridges.fit_bridges(runner, depth_only, progress=False, batches=fit)
    assert fits and all(f.tokens + f.held_back_tokens == 4 * 24 for f in fits)  # one batch
    kl = runner.score(bridged, tk.objectives.Logits(), batches=held)
    assert splits[0]["share"] == 0.0 and splits[0]["kl"] == pytest.approx(kl)
    best = min(splits, key=lambda s: s["kl"])
    assert result.report["width"]["share"] == best["share"]
    assert "bridges" in result.report


def test_gptailor_plans_are_width_pruned_on_their_own_candidates(family, tokens, tmp_path):
    """A stitched plan's layers come from several models: their importance is measured on
    a runner opened on all of them, and the built model computes what it scored."""
    result = tk.prune(
        str(family.base),
        method="gptailor",
        candidates=[str(c) for c in family.candidates],
        target_ratio=0.35,
        width_share=0.5,
        calibration=tokens,
        batch_size=4,
        progress=False,
        budget=6,
        popsize=6,
    )
    recipe = result.recipe
    assert set(recipe.models) == {"base", "c1", "c2"} and recipe.width is not None
    out = tk.build(recipe, tmp_path / "built", progress=False)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(tk.assemble(recipe)(input_ids=tokens).logits, model(tokens).logits)
