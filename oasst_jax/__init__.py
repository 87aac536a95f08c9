"""oasst_jax: a JAX/Flax SPMD trainer for the Open-Assistant Llama2 70B SFT v10 recipe."""

__version__ = "0.1.0"
