"""Llama-2-13B."""

import ml_collections

from oasst_jax.config import llama2_model


def get_config() -> ml_collections.ConfigDict:
    return llama2_model(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
    )
