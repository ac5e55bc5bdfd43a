"""The sections of ``launch/bench_kernels.py``, one module each, over shared timing helpers.

``launch/`` is not an installed package: ``bench_kernels.py`` puts its own folder on ``sys.path`` and
imports ``kernel_bench.<section>``. ``timing`` holds the timers and the :class:`~kernel_bench.timing.Runner`
that records rows and JSON; ``common`` the benchmarked shape (Llama-3.1-8B) and the kernels under test.
"""
