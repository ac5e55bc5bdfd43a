"""Fidelity harness: FreeKV decoding vs. dense attention on a real model, on the CPU.

``python -m freekv_sglang.fidelity --help``. Modules: :mod:`.model` (load/convert),
:mod:`.hook` (the ``"freekv"`` transformers attention function), :mod:`.kvcache`,
:mod:`.rows` (variants), :mod:`.texts`, :mod:`.tasks`, :mod:`.metrics`, :mod:`.report`.
"""
