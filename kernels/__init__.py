"""Triton and FlashInfer kernels for FreeKV (installed as ``freekv_sglang.kernels``)."""
