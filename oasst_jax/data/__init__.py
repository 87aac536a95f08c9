"""Datasets: upstream loaders yielding conversations, the shard and Megatron formats, the grain
input pipeline; builds on the text layer (``oasst_jax.turns``, ``readers``), knows no model."""
