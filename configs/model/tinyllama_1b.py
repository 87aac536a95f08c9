"""TinyLlama-1.1B's shape (the train-step benchmark's model): GQA 32/4, 22 layers."""

import ml_collections

from oasst_jax.config import llama2_model


def get_config() -> ml_collections.ConfigDict:
    c = llama2_model(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
    )
    c.attention_impl = "pallas"
    return c
