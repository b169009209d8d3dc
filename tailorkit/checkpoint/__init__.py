"""Reading and writing checkpoints: safetensors headers, sources, the streaming writer."""
