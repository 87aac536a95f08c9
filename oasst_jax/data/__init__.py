"""Datasets: upstream loaders yielding conversations, the shard and Megatron formats, the grain
input pipeline; builds on the text layer (``oasst_jax.text``, ``readers``), knows no model."""
