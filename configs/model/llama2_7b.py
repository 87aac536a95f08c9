"""Llama-2-7B (Touvron et al. 2023, Table 1 / HF config.json)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            vocab_size=32002,  # Llama-2's 32000 + <|im_start|>, <|im_end|>
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            rope_theta=10000.0,
            rope_scaling_factor=1.0,
            rms_norm_eps=1e-5,
            dtype="bfloat16",
            param_dtype="float32",
            remat_policy="selective",
            attention_impl="xla",
        )
    )
