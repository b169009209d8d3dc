"""Greedy text from a built checkpoint or straight from a recipe: a quick look at a model."""

from __future__ import annotations

from pathlib import Path

import torch

from tailorkit.recipe import Recipe


def load_for_generation(model: str | Path):
    """(model, tokenizer) from a built checkpoint, a model reference, or a recipe file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tailorkit.assemble import assemble
    from tailorkit.checkpoint.source import resolve

    path = Path(model)
    if path.is_file():
        plan = Recipe.load(path).plan()
        return assemble(plan), AutoTokenizer.from_pretrained(plan.base.path)
    from tailorkit.eval.run import check_checkpoint_dir

    local = resolve(str(model))
    check_checkpoint_dir(local)  # safetensors weights, never a pickle
    loaded = AutoModelForCausalLM.from_pretrained(local, use_safetensors=True)
    return loaded.eval(), AutoTokenizer.from_pretrained(local)


def generate(model, tokenizer, prompt: str, *, max_new_tokens: int = 40, chat: bool = False) -> str:
    """Greedy continuation of ``prompt`` (a chat turn when ``chat``); only the new text."""
    if chat and tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
