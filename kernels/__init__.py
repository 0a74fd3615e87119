"""Fused Triton kernels for the hot ops of a Llama 2 block (installed as llamatrain.kernels)."""
