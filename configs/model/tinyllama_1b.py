"""TinyLlama-1.1B's shape (the train-step benchmark's model): GQA 32/4, 22 layers."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            vocab_size=32002,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            max_position_embeddings=4096,
            rope_theta=10000.0,
            rope_scaling_factor=1.0,
            rms_norm_eps=1e-5,
            dtype="bfloat16",
            param_dtype="float32",
            remat_policy="selective",
            attention_impl="pallas",
        )
    )
