"""sorted_jax: Sorted Fine-Tuning (SoFT) of LLaMA models in JAX/Flax."""

__version__ = "0.1.0"
