"""Helpers for tests that need a model whose outputs depend on its KV cache."""
