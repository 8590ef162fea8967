"""The tiny architectures the refit tests build, one per (model type, tied LM head)."""
from opd_megatron.models.arch import ModelArch


def tiny_arch(model_type: str, tied: bool) -> ModelArch:
    return ModelArch(model_type=model_type, vocab_size=300, hidden_size=64, intermediate_size=96,
                     num_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     tie_word_embeddings=tied)
