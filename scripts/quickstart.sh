#!/usr/bin/env bash
# The main job on the built-in default model: tailor SmolLM2-135M-Instruct from 30 to 22
# layers with examples/smollm2-stitch.yaml, then let the dense and the tailored model answer.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
tk=.venv/bin/tailorkit
out="${1:-out/smollm2-22L}"
$tk validate examples/smollm2-stitch.yaml
$tk build examples/smollm2-stitch.yaml "$out" --overwrite
prompt="What is the capital of France?"
echo "--- dense (30 layers):";    $tk generate builtin:smollm2-135m-instruct "$prompt" --chat --max-new-tokens 30
echo "--- tailored (22 layers):"; $tk generate "$out" "$prompt" --chat --max-new-tokens 30
echo "tailored checkpoint: $out (config.json, safetensors, tokenizer, recipe.yaml, README.md)"
