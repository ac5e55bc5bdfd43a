"""FreeKV's serving runtime inside SGLang: host tier, GPU working sets, the per-layer steps
(:mod:`.engine`), memory sizing (:mod:`.sizing`), and the SGLang pool, attention backend and hooks
(:mod:`.pool`, :mod:`.backend`, :mod:`.integration`). Submodules import SGLang/CUDA pieces lazily."""
