"""Llama-2-70B: grouped-query attention with 8 kv heads."""

import ml_collections

from oasst_jax.config import llama2_model


def get_config() -> ml_collections.ConfigDict:
    return llama2_model(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
    )
