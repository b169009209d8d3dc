"""Tiny random models of each supported architecture, for fast tests.

Each model is a real transformers model with toy sizes (hidden 64, 4 heads,
vocabulary 256), saved as a standard Hugging Face checkpoint; no tokenizer
(tests feed token ids).  Every architecture exercises something of its own:

==========  ==========================================================  ======
arch        what it exercises                                           tied
==========  ==========================================================  ======
llama       plain pre-norm decoder; grouped-query attention             no
mistral     sliding window (a scalar, not a per-layer list)             no
qwen2       q/k/v biases; ``layer_types`` (all full attention)          yes
qwen3       per-head q/k RMSNorm; ``layer_types``                       yes
gemma2      four norms per layer; sliding/full alternation; softcaps    yes
gemma3      ``gemma3_text``; ``layer_types`` mixing sliding and full    yes
phi3        fused ``qkv_proj`` and ``gate_up_proj``                     no
gpt2        ``transformer.h.<i>``; Conv1D weights; learned positions    yes
==========  ==========================================================  ======

``make_tiny_model(arch, path, perturb_from=base)`` makes a "fine-tune" of an
existing tiny model (same names and shapes, small noise added), so tests can
build a base + candidates family.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch

ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2"]

# Toy sizes shared by every architecture.
HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS  # 16
INTERMEDIATE = 128
VOCAB = 256
MAX_POSITIONS = 128
SLIDING_WINDOW = 8  # small, so sequences of a few dozen tokens feel it

PERTURB_SCALE = 1e-2


def _layer_types(num_layers: int, full_every: int) -> list[str]:
    """Sliding attention except every ``full_every``-th layer (1-based)."""
    return [
        "full_attention" if (i + 1) % full_every == 0 else "sliding_attention"
        for i in range(num_layers)
    ]


def tiny_config(arch: str, num_layers: int = 4):
    """The transformers config of the tiny model for ``arch``."""
    import transformers

    common = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=num_layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "llama":
        return transformers.LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "mistral":
        return transformers.MistralConfig(
            **common, sliding_window=SLIDING_WINDOW, tie_word_embeddings=False
        )
    if arch == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=HEAD_DIM, tie_word_embeddings=True)
    if arch == "gemma2":
        # Gemma2's own pattern: sliding and full attention alternate.
        return transformers.Gemma2Config(
            **common,
            head_dim=HEAD_DIM,
            query_pre_attn_scalar=HEAD_DIM,
            sliding_window=SLIDING_WINDOW,
            layer_types=_layer_types(num_layers, full_every=2),
            tie_word_embeddings=True,
        )
    if arch == "gemma3":
        # Every third layer global (the real models use every sixth, which
        # would leave a 4-layer toy with no full-attention layer at all).
        return transformers.Gemma3TextConfig(
            **common,
            head_dim=HEAD_DIM,
            query_pre_attn_scalar=HEAD_DIM,
            sliding_window=SLIDING_WINDOW,
            layer_types=_layer_types(num_layers, full_every=3),
            sliding_window_pattern=3,  # saved as _sliding_window_pattern
            tie_word_embeddings=True,
        )
    if arch == "phi3":
        return transformers.Phi3Config(**common, tie_word_embeddings=False)
    if arch == "gpt2":
        return transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=HIDDEN,
            n_layer=num_layers,
            n_head=HEADS,
            n_inner=INTERMEDIATE,
            n_positions=MAX_POSITIONS,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=True,
        )
    raise ValueError(f"unknown tiny architecture {arch!r}; known: {ARCHITECTURES}")


def _model_class(arch: str):
    import transformers

    return {
        "llama": transformers.LlamaForCausalLM,
        "mistral": transformers.MistralForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "qwen3": transformers.Qwen3ForCausalLM,
        "gemma2": transformers.Gemma2ForCausalLM,
        "gemma3": transformers.Gemma3ForCausalLM,
        "phi3": transformers.Phi3ForCausalLM,
        "gpt2": transformers.GPT2LMHeadModel,
    }[arch]


def _save(model, path: Path, max_shard_size: str | None) -> None:
    kwargs = {}
    params = inspect.signature(model.save_pretrained).parameters
    if "safe_serialization" in params:  # transformers 4.x; 5.x is always safe
        kwargs["safe_serialization"] = True
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kwargs)


def save_char_tokenizer(path: str | os.PathLike) -> None:
    """A character-level tokenizer of VOCAB ids (printable ASCII + newline, ``<eos>`` = 0,
    ``<unk>`` = 1), so tiny models take text like real ones (calibration, CLI tests)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["\n", *(chr(c) for c in range(32, 127))]
    vocab = {"<eos>": 0, "<unk>": 1} | {c: i + 2 for i, c in enumerate(chars)}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(path)


def make_tiny_model(
    arch: str,
    path: str | os.PathLike,
    *,
    seed: int = 0,
    num_layers: int | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: str | None = None,
    perturb_from: str | os.PathLike | None = None,
) -> Path:
    """Build and save a tiny random model of ``arch``; return its directory.

    Args:
        arch: one of :data:`ARCHITECTURES`.
        path: output directory (created).
        seed: seeds the random weights (or the noise, with ``perturb_from``).
        num_layers: decoder layers; default 4, or the source's count with
            ``perturb_from`` (a different count is an error).
        dtype: dtype of the saved weights; default float32, or the source's
            dtype with ``perturb_from``.
        max_shard_size: e.g. ``"100KB"`` to get a sharded checkpoint with
            ``model.safetensors.index.json``; default one file.
        perturb_from: an existing tiny model of the same ``arch``; the result
            is that model plus ``1e-2 * randn`` on every parameter (same
            tensor names and shapes: a "fine-tune").
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {ARCHITECTURES}")
    torch.manual_seed(seed)

    if perturb_from is not None:
        model = AutoModelForCausalLM.from_pretrained(perturb_from, dtype="auto")
        expected = tiny_config(arch).model_type
        if model.config.model_type != expected:
            raise ValueError(
                f"perturb_from={perturb_from} is a {model.config.model_type!r} "
                f"model, not {expected!r}"
            )
        if num_layers is not None and num_layers != model.config.num_hidden_layers:
            raise ValueError(
                f"num_layers={num_layers} but perturb_from={perturb_from} has "
                f"{model.config.num_hidden_layers} layers"
            )
        target = dtype or model.dtype
        model = model.float()
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            # named_parameters() yields a tied weight once, so it stays tied.
            for _, param in sorted(model.named_parameters()):
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
                param.add_(noise, alpha=PERTURB_SCALE)
        model = model.to(target)
    else:
        config = tiny_config(arch, num_layers if num_layers is not None else 4)
        model = _model_class(arch)(config).to(dtype or torch.float32)

    model.eval()
    path.mkdir(parents=True, exist_ok=True)
    _save(model, path, max_shard_size)
    save_char_tokenizer(path)
    return path
