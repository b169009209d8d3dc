"""Greedy text from a model (loaded by ``tailorkit.eval.load_model``): a quick look at it."""

from __future__ import annotations

import torch


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
