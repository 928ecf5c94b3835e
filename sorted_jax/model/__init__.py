"""The LLaMA model: its config, the Flax modules (scanned stack, exits, KV cache), HF names."""
