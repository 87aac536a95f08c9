"""A tiny Llama that trains on a laptop CPU in seconds (same code path as 70B, GQA included)."""

import ml_collections

from oasst_jax.config import llama2_model


def get_config() -> ml_collections.ConfigDict:
    return llama2_model(
        vocab_size=1002,  # 1000-piece sentencepiece model (README) + 2 chatml ids
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        dtype="float32",
        remat_policy="none",
    )
