"""On-policy distillation and self-distillation on Megatron-core."""
