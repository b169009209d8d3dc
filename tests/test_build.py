"""Build and assemble, end to end on real files of every architecture.

The central promise: the streamed checkpoint, loaded by transformers, and the
in-memory assembly give identical logits; and a failed build leaves nothing.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import ARCHITECTURES
from transformers import AutoModelForCausalLM

import tailorkit as tk
from tailorkit.checkpoint.source import Source
from tailorkit.cli import main as cli
from tailorkit.errors import MergeError, RecipeError


def _stitch(base, ft) -> dict:
    """4 -> 4 layers: passthrough, a linear merge, a dropped layer, task arithmetic, ties."""
    return {
        "models": {"base": str(base), "ft": str(ft)},
        "layers": [
            {"from": "base", "layers": [0, 1]},
            {
                "merge": "linear",
                "sources": [
                    {"from": "base", "layer": 1, "weight": 0.3},
                    {"from": "ft", "layer": 1, "weight": 0.7},
                ],
            },
            {
                "merge": "task_arithmetic",
                "base": {"from": "base", "layer": 3},
                "sources": [{"from": "ft", "layer": 3}],
                "lambda": 0.5,
            },
            {
                "merge": "ties",
                "base": {"from": "base", "layer": 2},
                "sources": [{"from": "ft", "layer": 2}, {"from": "ft", "layer": 3}],
                "density": 0.4,
            },
        ],
    }


def _logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(
        0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed)
    )
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_built_checkpoint_equals_assembly(arch, tiny_model_factory, tmp_path):
    base = tiny_model_factory(arch, sharded=True)
    ft = tiny_model_factory(arch, variant="a")
    recipe = tk.Recipe.from_dict(_stitch(base, ft))
    out = tk.build(recipe, tmp_path / "out", shard_size="200KB", progress=False)

    files = {p.name for p in out.iterdir()}
    assert {"config.json", "recipe.yaml", "README.md", "model.safetensors.index.json"} <= files
    assert tk.Recipe.load(out / "recipe.yaml") == recipe
    config = json.loads((out / "config.json").read_text())
    count_key = "n_layer" if arch == "gpt2" else "num_hidden_layers"
    assert config[count_key] == 4

    loaded = AutoModelForCausalLM.from_pretrained(out)
    assembled = tk.assemble(recipe)
    assert loaded.dtype == assembled.dtype == torch.float32
    assert torch.equal(_logits(loaded), _logits(assembled))
    # And the tailored model really differs from the base.
    assert not torch.equal(_logits(loaded), _logits(AutoModelForCausalLM.from_pretrained(base)))


def test_per_layer_config_lists_follow_their_layers(tiny_model_factory, tmp_path):
    base = tiny_model_factory("gemma3", num_layers=6)
    src_types = json.loads((base / "config.json").read_text())["layer_types"]
    order = [5, 0, 2]
    recipe = tk.Recipe.from_dict(
        {"models": {"g": str(base)}, "layers": [{"from": "g", "layer": i} for i in order]}
    )
    out = tk.build(recipe, tmp_path / "out", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    assert config["layer_types"] == [src_types[i] for i in order]
    assert len(set(config["layer_types"])) == 2  # the test means something: both kinds survive
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(_logits(loaded), _logits(tk.assemble(recipe)))


def test_passthrough_is_byte_exact_and_assembly_shares_memory(family, tmp_path):
    recipe = tk.Recipe.from_dict(
        {
            "models": {"b": str(family.base), "a": str(family.candidates[0])},
            "layers": [
                {"from": "a", "layer": 2},
                {"from": "b", "layers": [0, 2]},
                {"from": "a", "layer": 2},
            ],
        }
    )
    out = tk.build(recipe, tmp_path / "out", progress=False)
    built = load_file(out / "model.safetensors")
    cand = load_file(family.candidates[0] / "model.safetensors")
    for rest in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
        assert torch.equal(built[f"model.layers.0.{rest}"], cand[f"model.layers.2.{rest}"])
        assert torch.equal(built[f"model.layers.3.{rest}"], cand[f"model.layers.2.{rest}"])

    model = tk.assemble(recipe)
    first = model.model.layers[0].self_attn.q_proj.weight
    last = model.model.layers[3].self_attn.q_proj.weight
    src = Source(str(family.candidates[0]))
    assert first.data_ptr() == last.data_ptr()  # the same source layer twice: one piece of memory
    assert torch.equal(first, src.view(src.tensors["model.layers.2.self_attn.q_proj.weight"]))


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "slerp", "laco"])
def test_each_merge_method_matches_its_formula(method, family, tmp_path):
    base, a, b = (load_file(p / "model.safetensors") for p in family.all)
    name = "model.layers.{}.mlp.up_proj.weight"
    entry = {
        "linear": {
            "merge": "linear",
            "sources": [{"from": "a", "layer": 1, "weight": 2}, {"from": "b", "layer": 1}],
        },
        "task_arithmetic": {
            "merge": "task_arithmetic",
            "base": {"from": "base", "layer": 1},
            "lambda": 0.7,
            "sources": [{"from": "a", "layer": 1}, {"from": "b", "layer": 1, "weight": 0.5}],
        },
        "ties": {
            "merge": "ties",
            "base": {"from": "base", "layer": 1},
            "density": 0.3,
            "lambda": 0.9,
            "sources": [{"from": "a", "layer": 1}, {"from": "b", "layer": 1}],
        },
        "slerp": {
            "merge": "slerp",
            "t": 0.3,
            "sources": [{"from": "a", "layer": 1}, {"from": "b", "layer": 2}],
        },
        "laco": {
            "merge": "laco",
            "sources": [
                {"from": "base", "layer": 1},
                {"from": "base", "layer": 2},
                {"from": "base", "layer": 3},
            ],
        },
    }[method]
    recipe = tk.Recipe.from_dict(
        {
            "models": {
                "base": str(family.base),
                "a": str(family.candidates[0]),
                "b": str(family.candidates[1]),
            },
            "layers": [entry],
        }
    )
    got = load_file(tk.build(recipe, tmp_path / "out", progress=False) / "model.safetensors")[
        name.format(0)
    ]

    def t(m, i):
        return m[name.format(i)].double()

    if method == "linear":
        want = (2 * t(a, 1) + t(b, 1)) / 3
    elif method == "task_arithmetic":
        want = t(base, 1) + 0.7 * ((t(a, 1) - t(base, 1)) + 0.5 * (t(b, 1) - t(base, 1)))
    elif method == "laco":
        want = t(base, 1) + (t(base, 2) - t(base, 1)) + (t(base, 3) - t(base, 1))
    elif method == "slerp":
        x, y = t(a, 1), t(b, 2)
        omega = torch.arccos((x * y).sum() / (x.norm() * y.norm()))
        want = (torch.sin(0.7 * omega) * x + torch.sin(0.3 * omega) * y) / torch.sin(omega)
    else:
        taus = [t(a, 1) - t(base, 1), t(b, 1) - t(base, 1)]
        kept = []
        for tau in taus:
            k = int(round(0.3 * tau.numel()))
            thr = tau.abs().flatten().kthvalue(tau.numel() - k + 1).values
            kept.append(torch.where(tau.abs() >= thr, tau, torch.zeros_like(tau)))
        sign = torch.sign(sum(kept))
        agree = [
            torch.where((torch.sign(k) == sign) & (k != 0), k, torch.zeros_like(k)) for k in kept
        ]
        count = sum((x != 0).double() for x in agree)
        mean = torch.where(count > 0, sum(agree) / count.clamp(min=1), torch.zeros_like(count))
        want = t(base, 1) + 0.9 * mean
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_merges_cover_norms_too(family, tmp_path):
    recipe = tk.Recipe.from_dict(
        {
            "models": {"a": str(family.candidates[0]), "b": str(family.candidates[1])},
            "layers": [
                {
                    "merge": "linear",
                    "sources": [{"from": "a", "layer": 0}, {"from": "b", "layer": 0}],
                }
            ],
        }
    )
    got = load_file(tk.build(recipe, tmp_path / "out", progress=False) / "model.safetensors")
    a, b = (load_file(p / "model.safetensors") for p in family.candidates)
    norm = "model.layers.0.post_attention_layernorm.weight"
    torch.testing.assert_close(got[norm], (a[norm] + b[norm]) / 2)
    assert not torch.equal(got[norm], a[norm])


def test_dtype_conversion_and_head_from_another_model(family, tmp_path):
    recipe = tk.Recipe.from_dict(
        {
            "models": {"base": str(family.base), "a": str(family.candidates[0])},
            "dtype": "bfloat16",
            "head": "a",
            "layers": [{"from": "base", "layers": [0, 2]}],
        }
    )
    out = tk.build(recipe, tmp_path / "out", progress=False)
    built = load_file(out / "model.safetensors")
    a = load_file(family.candidates[0] / "model.safetensors")
    base = load_file(family.base / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in built.values())
    assert torch.equal(built["lm_head.weight"], a["lm_head.weight"].bfloat16())
    assert torch.equal(
        built["model.embed_tokens.weight"], base["model.embed_tokens.weight"].bfloat16()
    )
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(_logits(loaded), _logits(tk.assemble(recipe)))


def test_tied_embeddings_write_no_head(tiny_model_factory, tmp_path):
    base = tiny_model_factory("qwen2")
    recipe = tk.Recipe.from_dict(
        {"models": {"q": str(base)}, "layers": [{"from": "q", "layer": 1}]}
    )
    out = tk.build(recipe, tmp_path / "out", progress=False)
    with safe_open(out / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    model = tk.assemble(recipe)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_parameter_counts_and_removed_fractions(family):
    plan = tk.Recipe.from_dict(
        {
            "models": {"b": str(family.base)},
            "layers": [{"from": "b", "layers": [0, 3]}],
        }
    ).plan()
    per_layer = sum(t.numel for t in plan.base.layer(0).values())
    assert plan.base_parameters - plan.num_parameters == per_layer
    assert plan.removed_layer_fraction == pytest.approx(0.25)
    assert plan.removed_parameter_fraction == pytest.approx(per_layer / plan.base_parameters)


def test_nan_in_a_merge_names_layer_and_tensor_and_leaves_nothing(family, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(family.candidates[0], broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.1.mlp.gate_proj.weight"][3, 3] = float("nan")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    recipe = tk.Recipe.from_dict(
        {
            "models": {"b": str(family.base), "x": str(broken)},
            "layers": [
                {"from": "b", "layer": 0},
                {
                    "merge": "linear",
                    "sources": [{"from": "b", "layer": 1}, {"from": "x", "layer": 1}],
                },
            ],
        }
    )
    with pytest.raises(
        MergeError, match=r"output layer 1 .*'model.layers.1.mlp.gate_proj.weight'.*non-finite"
    ):
        tk.build(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["broken"]  # no temporary directory left


def test_interrupted_build_leaves_nothing(family, tmp_path, monkeypatch):
    from tailorkit.checkpoint import writer

    calls = {"n": 0}
    real = writer.ShardWriter.copy

    def flaky(self, *args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(writer.ShardWriter, "copy", flaky)
    recipe = tk.Recipe.from_dict(
        {"models": {"b": str(family.base)}, "layers": [{"from": "b", "layers": [0, 4]}]}
    )
    with pytest.raises(KeyboardInterrupt):
        tk.build(recipe, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite_and_stale_temp_dirs_are_cleaned(family, tmp_path):
    recipe = tk.Recipe.from_dict(
        {"models": {"b": str(family.base)}, "layers": [{"from": "b", "layer": 0}]}
    )
    stale = tmp_path / ".out.tailorkit-tmp-999999999-abc"  # a writer that died (no such pid)
    stale.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(tk.TailorkitError, match="already exists"):
        tk.build(recipe, tmp_path / "out", progress=False)
    with pytest.raises(tk.TailorkitError, match="tailorkit did not build"):
        tk.build(recipe, tmp_path / "out", overwrite=True, progress=False)  # not ours to delete
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    (tmp_path / "out" / "keep.txt").unlink()
    tk.build(recipe, tmp_path / "out", progress=False)  # an empty folder holds nothing to lose
    tk.build(recipe, tmp_path / "out", overwrite=True, progress=False)  # a previous build
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _write(tmp_path, recipe: dict):
    path = tmp_path / "recipe.yaml"
    import yaml

    path.write_text(yaml.safe_dump(recipe))
    return path


def test_cli_build_and_validate(family, tmp_path, capsys):
    path = _write(tmp_path, _stitch(family.base, family.candidates[0]))
    assert cli(["validate", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        report["layers"] == 4 and report["output_layers"][1] == "linear(base[1] x0.3, ft[1] x0.7)"
    )
    assert (
        cli(
            [
                "build",
                str(path),
                str(tmp_path / "out"),
                "--shard-size",
                "300KB",
                "--dtype",
                "float16",
                "-q",
            ]
        )
        == 0
    )
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.dtype == torch.float16


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda r: r["layers"].append({"from": "ft", "layer": 4}),
            "layer 4 of model 'ft' does not exist: it has 4 layers",
        ),
        (lambda r: r["layers"].clear(), "layers: List should have at least 1 item"),
        (lambda r: r.update(colour="red"), "colour: unknown key"),
        (lambda r: r["models"].update(ft="/no/such/dir"), "model 'ft': .*no such directory"),
    ],
)
def test_cli_bad_input_exits_nonzero_and_writes_nothing(family, tmp_path, capsys, mutate, message):
    recipe = _stitch(family.base, family.candidates[0])
    mutate(recipe)
    path = _write(tmp_path, recipe)
    assert cli(["build", str(path), str(tmp_path / "out"), "-q"]) == 2
    assert pytest.importorskip("re").search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_models_must_share_architecture_and_shapes(family, tiny_model_factory, tmp_path):
    gpt2 = tiny_model_factory("gpt2")
    with pytest.raises(RecipeError, match="model 'g' has model_type gpt2"):
        tk.Recipe.from_dict(
            {
                "models": {"b": str(family.base), "g": str(gpt2)},
                "layers": [{"from": "b", "layer": 0}],
            }
        ).plan()
    odd = tmp_path / "odd"
    shutil.copytree(family.candidates[0], odd)
    tensors = load_file(odd / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, odd / "model.safetensors")
    with pytest.raises(
        RecipeError, match=r"output layer 0 .*'mlp.up_proj.weight' has shape \[3, 3\] in odd\[1\]"
    ):
        tk.Recipe.from_dict(
            {
                "models": {"b": str(family.base), "odd": str(odd)},
                "layers": [
                    {
                        "merge": "linear",
                        "sources": [{"from": "b", "layer": 1}, {"from": "odd", "layer": 1}],
                    }
                ],
            }
        ).plan()
    config = json.loads((odd / "config.json").read_text())
    config["vocab_size"] += 1
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(RecipeError, match="vocabulary size"):
        tk.Recipe.from_dict(
            {
                "models": {"b": str(family.base), "odd": str(odd)},
                "layers": [{"from": "b", "layer": 0}],
            }
        ).plan()


def test_cli_truncated_shard_names_the_file(family, tmp_path, capsys):
    cut = tmp_path / "cut"
    shutil.copytree(family.candidates[0], cut)
    shard = cut / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    path = _write(tmp_path, {"models": {"c": str(cut)}, "layers": [{"from": "c", "layer": 0}]})
    assert cli(["build", str(path), str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "model 'c'" in err and str(shard) in err and "truncated" in err
    assert not (tmp_path / "out").exists()


def test_hub_id_goes_through_the_hub_client(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    recipe = tk.Recipe.from_dict(
        {"models": {"m": "some-org/some-model@main"}, "layers": [{"from": "m", "layer": 0}]}
    )
    with pytest.raises(
        tk.CheckpointError, match="model 'm': some-org/some-model@main: could not download"
    ):
        recipe.plan()
    bad = tk.Recipe.from_dict(
        {"models": {"m": "evil/../../nowhere"}, "layers": [{"from": "m", "layer": 0}]}
    )
    with pytest.raises(tk.CheckpointError, match="not a Hub repo id"):
        bad.plan()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_finite_check_finds_every_nan_and_inf_and_counts_them(dtype, bad):
    """One aminmax decides; each non-finite value, wherever it lies, is found and counted."""
    from tailorkit.merge import FINITE_CHECK_ELEMENTS, check_finite

    n = 2 * FINITE_CHECK_ELEMENTS + 3
    check_finite(torch.randn(n).to(dtype), "ok")
    check_finite(torch.empty(0, dtype=dtype), "empty")
    check_finite(torch.arange(5), "integers are not checked")
    for positions in ([0], [n - 1], [FINITE_CHECK_ELEMENTS, 17, n - 2]):
        t = torch.randn(n).to(dtype)
        t[positions] = bad
        with pytest.raises(MergeError, match=f"tensor x: the merge produced {len(positions)} non"):
            check_finite(t.reshape(-1, 1), "tensor x")


@pytest.mark.parametrize("gather", [False, True], ids=["whole", "gathered"])
def test_linear_merges_count_nonfinite_values_in_the_kernels_pass(gather, monkeypatch):
    """The linear path makes no second pass over its output: the merge's own count finds
    every NaN and inf of the chunk it is in, and the error names the tensor."""
    from tailorkit import merge
    from tailorkit.recipe import OutputLayer

    def second_pass(*args, **kwargs):
        raise AssertionError("check_finite ran: the output was read a second time")

    monkeypatch.setattr(merge, "check_finite", second_pass)
    layer = OutputLayer("linear", (("a", 0), ("b", 0)), (0.5, 0.5))
    a, b = torch.randn(64, 256).to(torch.bfloat16), torch.randn(64, 256)
    keep = merge.Gather(torch.arange(0, 64, 2), 0) if gather else None
    chunks = merge.merge_chunks(
        layer, [a, b], None, torch.bfloat16, where="t", chunk_elements=4096, gather=keep
    )
    assert sum(c.numel() for c in chunks) == (32 if gather else 64) * 256
    # Chunks of 16 output rows: source rows 32-47 (whole), or the even rows 32-62 (gathered).
    b[40, 7], b[40, 9], b[62, 0], b[63, 0] = float("nan"), float("inf"), -float("inf"), 3e38
    chunks = merge.merge_chunks(
        layer, [a, b], None, torch.bfloat16, where="t", chunk_elements=4096, gather=keep
    )
    with pytest.raises(MergeError, match=f"t: the merge produced {3 if gather else 2} non-fin"):
        list(chunks)


@pytest.mark.parametrize("gather", [False, True], ids=["whole", "gathered"])
def test_chunks_made_in_one_buffer_are_the_merge(gather):
    """A build makes every chunk in one buffer (grown to the largest chunk): the same
    values as fresh chunks, all in the same memory."""
    from tailorkit import merge
    from tailorkit.recipe import OutputLayer

    layer = OutputLayer("linear", (("a", 0), ("b", 0)), (0.25, 0.75))
    a, b = torch.randn(96, 130).to(torch.bfloat16), torch.randn(96, 130)
    keep = merge.Gather(torch.arange(0, 96, 3), 0) if gather else None
    buffer = merge.ChunkBuffer()
    small = merge.merge_chunks(
        layer, [a[:8], b[:8]], None, torch.float32, where="t", chunk_elements=512, buffer=buffer
    )
    assert torch.cat([c.clone() for c in small]).numel() == 8 * 130
    fresh, pointers, made = [], set(), []
    for buffered in (False, True):
        chunks = merge.merge_chunks(
            layer, [a, b], None, torch.bfloat16, where="t", chunk_elements=2000,
            gather=keep, buffer=buffer if buffered else None,
        )  # fmt: skip
        for chunk in chunks:
            (made if buffered else fresh).append(chunk.clone())
            if buffered:
                pointers.add(chunk.data_ptr())
    start = torch.frombuffer(buffer._bytes, dtype=torch.uint8).data_ptr()
    assert len(made) > 2 and pointers == {start}
    assert torch.equal(torch.cat(made), torch.cat(fresh))
