"""Triton device code of fused_softmax, one module per operation (installed as fused_softmax.kernels)."""
