#!/usr/bin/env bash
# The main job on the built-in default model, with the single-model pipeline that measures best
# (benchmarks/RESULTS.md, "Bridges"): ShortGPT removes the 9 layers (about a quarter of
# SmolLM2-135M-Instruct's parameters) with the lowest Block Influence, then a linear bridge is
# fitted after every gap (all on the public-domain text bundled with tailorkit); builds the
# checkpoint with its model card, scores it against the dense model on the offline task suite,
# and lets both answer a question. About 5 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
tk=.venv/bin/tailorkit
out="${1:-out/smollm2-shortgpt-bridged}"
mkdir -p "$(dirname "$out")"
$tk cka --num-windows 8 --plot "$out-cka.png" --json "$out-cka.json"
$tk prune --method shortgpt --target-ratio 0.25 --bridge --num-windows 32 --out "$out" --overwrite
$tk validate "$out/recipe.yaml"
$tk eval "$out" --tasks tk_next_line --limit 40 --compare builtin:smollm2-135m-instruct \
    --json "$out-eval.json"
prompt="What is the capital of France?"
echo "--- dense (30 layers):";  $tk generate builtin:smollm2-135m-instruct "$prompt" --chat --max-new-tokens 30
echo "--- tailored:";           $tk generate "$out" "$prompt" --chat --max-new-tokens 30
echo "tailored checkpoint: $out (config.json, safetensors, tokenizer, recipe.yaml and the bridges in recipe.safetensors, README.md model card, cka.png, report.json)"
