"""Llama-2-7B (Touvron et al. 2023, Table 1; Hugging Face config.json)."""

import ml_collections

from oasst_jax.config import llama2_model


def get_config() -> ml_collections.ConfigDict:
    return llama2_model(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
    )
