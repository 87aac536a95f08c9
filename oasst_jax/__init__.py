"""oasst_jax: a JAX/Flax SPMD trainer for the Open-Assistant Llama2 70B SFT v10 recipe.

The commands (``python -m oasst_jax.VERB``) live in :mod:`oasst_jax.cli`; everything else is
the library they call.  docs/architecture.md has the layout and its import rules.
"""

__version__ = "0.1.0"
