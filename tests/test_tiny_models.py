"""The tiny test models are real, loadable checkpoints of each architecture."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tiny_models import ARCHITECTURES, SLIDING_WINDOW, VOCAB, make_tiny_model

# Expected per architecture: is lm_head tied to the embeddings?
TIED = {
    "llama": False,
    "mistral": False,
    "qwen2": True,
    "qwen3": True,
    "gemma2": True,
    "gemma3": True,
    "phi3": False,
    "gpt2": True,
}


def _tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    return out


def test_the_matrix_covers_tied_and_untied():
    assert set(TIED) == set(ARCHITECTURES)
    assert any(TIED.values()) and not all(TIED.values())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_loads_and_runs(arch, tiny_model_factory):
    from transformers import AutoModelForCausalLM

    path = tiny_model_factory(arch)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.num_hidden_layers == 4
    ids = torch.randint(0, VOCAB, (2, 3 * SLIDING_WINDOW))  # (B, T), T beyond the window
    with torch.no_grad():
        logits = model(ids).logits  # (B, T, V)
    assert logits.shape == (2, 3 * SLIDING_WINDOW, VOCAB)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0

    names = set(_tensors(path))
    assert ("lm_head.weight" not in names) == TIED[arch]
    config = json.loads((path / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float32"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sharded_has_index_and_same_weights(arch, tiny_model_factory):
    plain = tiny_model_factory(arch)
    sharded = tiny_model_factory(arch, sharded=True)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2
    assert shards == {p.name for p in sharded.glob("*.safetensors")}
    assert not (sharded / "model.safetensors").exists()

    a, b = _tensors(plain), _tensors(sharded)
    assert set(index["weight_map"]) == set(b) == set(a)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_gemma_layer_types_mix_sliding_and_full(tiny_model_factory):
    for arch in ("gemma2", "gemma3"):
        config = json.loads((tiny_model_factory(arch) / "config.json").read_text())
        types = config["layer_types"]
        assert len(types) == config["num_hidden_layers"]
        assert set(types) == {"sliding_attention", "full_attention"}
    gemma3 = json.loads((tiny_model_factory("gemma3") / "config.json").read_text())
    assert gemma3["model_type"] == "gemma3_text"


def test_family_is_perturbed_copies(family):
    base = _tensors(family.base)
    seen = []
    for candidate in family.candidates:
        tensors = _tensors(candidate)
        assert tensors.keys() == base.keys()
        for name, tensor in tensors.items():
            assert tensor.shape == base[name].shape and tensor.dtype == base[name].dtype
            delta = (tensor - base[name]).abs().max().item()
            assert 0 < delta < 0.1, name
        seen.append(tensors)
    # The two fine-tunes differ from each other too.
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(seen[0][name], seen[1][name])


def test_deterministic_and_dtype(tmp_path):
    a = make_tiny_model("qwen3", tmp_path / "a", seed=3, dtype=torch.bfloat16, num_layers=6)
    b = make_tiny_model("qwen3", tmp_path / "b", seed=3, dtype=torch.bfloat16, num_layers=6)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    config = json.loads((a / "config.json").read_text())
    assert config["num_hidden_layers"] == 6 and len(config["layer_types"]) == 6
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert {t.dtype for t in _tensors(a).values()} == {torch.bfloat16}

    ft = make_tiny_model("qwen3", tmp_path / "ft", seed=4, perturb_from=a)
    assert {t.dtype for t in _tensors(ft).values()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="layers"):
        make_tiny_model("qwen3", tmp_path / "bad", num_layers=4, perturb_from=a)
    with pytest.raises(ValueError, match="not 'llama'"):
        make_tiny_model("llama", tmp_path / "bad2", perturb_from=a)
