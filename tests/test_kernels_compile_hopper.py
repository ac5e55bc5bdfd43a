"""Triton kernels compiled for Hopper (sm_90) on a machine without a GPU.

Triton's CPU interpreter checks a kernel's arithmetic but not what only the compiler sees: shapes
``tl.dot`` accepts, layouts, and the shared memory a pipelined configuration needs. This compiles
the Triton split decode (its configurations in ``launch/kernel_bench/`` and the runtime's) and the
grid-code kernels (``kernels/grid_codes.py``, checked to use tensor cores) to a cubin for sm_90 with
Triton's bundled ``ptxas`` and checks that each fits an H100/H200 SM's shared memory (227 KiB per
block), so a configuration that could not launch is caught before a GPU run.
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from freekv_sglang.kernels import split_decode as sd  # noqa: E402
from freekv_sglang.kernels.common import interpreter_forced  # noqa: E402

if interpreter_forced():
    pytest.skip("TRITON_INTERPRET=1: kernels are interpreted, not compiled", allow_module_level=True)

HOPPER = GPUTarget("cuda", 90, 32)
HOPPER_SMEM_PER_BLOCK = 232448  # bytes (227 KiB), cudaDevAttrMaxSharedMemoryPerBlockOptin on H100/H200


def compile_for_hopper(fn, types: dict, constexprs: dict, num_warps: int, num_stages: int):
    """Compile ``fn`` (a ``@triton.jit`` function, not interpreted) for sm_90.

    ``types`` maps each runtime argument name to a Triton type string (``"*bf16"``, ``"i32"``,
    ``"fp32"``); ``constexprs`` gives every ``tl.constexpr`` argument's value."""
    names = fn.arg_names
    missing = set(names) - set(types) - set(constexprs)
    assert not missing, f"no type or value for {sorted(missing)}"
    signature = {n: ("constexpr" if n in constexprs else types[n]) for n in names}
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(n),): v for n, v in constexprs.items()})
    return triton.compile(src, target=HOPPER, options={"num_warps": num_warps, "num_stages": num_stages})


def _split_decode_types(dtype: str) -> dict:
    return {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "indptr_ptr": "*i32",
            "indices_ptr": "*i32", "lpl_ptr": "*i32", "po_ptr": "*fp32", "plse_ptr": "*fp32", "qk_scale": "fp32",
            "stride_qb": "i32", "stride_qh": "i32"}


@pytest.mark.parametrize("dtype,d,page,g", [("bf16", 128, 32, 4), ("fp16", 64, 64, 7), ("bf16", 128, 16, 1)])
@pytest.mark.parametrize("pages", [1, 2, 4])
def test_split_decode_compiles_for_hopper(dtype, d, page, g, pages):
    consts = {"HKV": 8, "G": g, "G_PAD": 16, "PAGE": page, "D": d, "N_SPLIT": 8, "PER_SPLIT": 8, "PAGES": pages,
              "DOT_F32": False}
    for stages in (2, 3):
        k = compile_for_hopper(sd._split_decode_kernel, _split_decode_types(dtype), consts, 4, stages)
        assert k.asm.get("cubin"), "no cubin"
        assert k.metadata.shared <= HOPPER_SMEM_PER_BLOCK, (
            f"{consts} with {stages} stages needs {k.metadata.shared} bytes of shared memory")


def test_merge_kernel_compiles_for_hopper():
    types = {"po_ptr": "*fp32", "plse_ptr": "*fp32", "out_ptr": "*bf16", "stride_ob": "i32", "stride_oh": "i32"}
    k = compile_for_hopper(sd._merge_kernel, types, {"HQ": 32, "D": 128, "N_SPLIT": 8, "SPLIT_PAD": 8}, 4, 1)
    assert k.asm.get("cubin")


# ------------------------------------------------------------------ grid codes (kernels/grid_codes.py)
def _grid_score_types(dtype: str) -> dict:
    from freekv_sglang.kernels import grid_codes as gc

    types = {n: "i32" for n in gc._score_pages_grid_kernel.arg_names}
    types.update(q_ptr=f"*{dtype}", codes_ptr="*u8", lo_ptr="*fp32", step_ptr="*fp32", gidx_ptr="*i64",
                 r2t_ptr="*i32", rpi_ptr="*i64", nctx_ptr="*i32", hmask_ptr="*u8", out_ptr="*fp32", qk_scale="fp32")
    return types


@pytest.mark.parametrize("dtype,d,page,g,agg", [("bf16", 128, 32, 4, 0), ("fp16", 64, 16, 3, 1),
                                                ("bf16", 128, 32, 3, 2), ("bf16", 64, 256, 4, 0)])
@pytest.mark.parametrize("block_n,warps,stages", [(64, 4, 2), (128, 8, 3), (32, 4, 1)])
@pytest.mark.parametrize("int8", [False, True])
def test_grid_score_kernel_compiles_for_hopper(dtype, d, page, g, agg, block_n, warps, stages, int8):
    """The grid-code scoring kernel: a cubin within the shared memory of an SM, its products on tensor cores
    (``wgmma``, int8 ``s8`` products with the int8 path, whose codes are unpacked four bytes per register)."""
    from freekv_sglang.kernels import grid_codes as gc

    consts = {"HKV": 8, "G": g, "BLOCK_G": gc.grid_block_g(g, int8), "DQ": d // 4, "PAGE": page, "BLOCK_N": block_n,
              "BLOCK_PG": gc.grid_block_pages(page, block_n), "AGG": agg, "HAS_MASK": agg == 1,
              "HAS_GIDX": agg == 2, "F32_DOT": False, "STAGES": stages, "I8": int8}
    k = compile_for_hopper(gc._score_pages_grid_kernel, _grid_score_types(dtype), consts, warps, stages)
    assert k.asm.get("cubin"), "no cubin"
    assert k.metadata.shared <= HOPPER_SMEM_PER_BLOCK, f"{consts} needs {k.metadata.shared} bytes of shared memory"
    ptx = k.asm["ptx"]
    assert "wgmma.mma_async" in ptx, "the scores' products are not on tensor cores"
    if int8:
        assert ".s32.s8.s8" in ptx and "0x03030303" in ptx, "int8 products or the packed unpacking are missing"


@pytest.mark.parametrize("dtype,d,page", [("bf16", 128, 32), ("fp16", 64, 256)])
def test_grid_pack_kernel_compiles_for_hopper(dtype, d, page):
    from freekv_sglang.kernels import grid_codes as gc

    types = {n: "i32" for n in gc._pack_grid_codes_kernel.arg_names}
    types.update(src_ptr=f"*{dtype}", row0_ptr="*i32", dst_ptr="*i64", gidx_ptr="*i64", lo_ptr="*fp32",
                 step_ptr="*fp32", codes_ptr="*u8")
    consts = {"HAS_GIDX": True, "PAGE": page, "DQ": d // 4, "BLOCK_P": min(page, 4096 // d)}
    k = compile_for_hopper(gc._pack_grid_codes_kernel, types, consts, 4, 1)
    assert k.asm.get("cubin"), "no cubin"


@pytest.mark.parametrize("grid,fill", [(False, False), (True, False), (False, True), ("int8", False)])
@pytest.mark.parametrize("block_n,sub,warps,stages", [(64, 2, 2, 3), (64, 1, 4, 2), (128, 1, 4, 2), (64, 2, 4, 3),
                                                    (256, 1, 8, 2)])
def test_fused_scoring_kernel_compiles_for_hopper(grid, fill, block_n, sub, warps, stages):
    """The fused selection's scoring kernel (``score_select``), Quest digests or grid codes (tensor cores either
    way), in the runtime's launch shapes (:func:`~freekv_sglang.kernels.score_select.launch_shape`); ``fill``: also
    storing the resident pages' keys (the over-fetch correction, 48 resident slots)."""
    from freekv_sglang.kernels import grid_codes as gc
    from freekv_sglang.kernels import score_select as ss

    fn = ss._score_block_topk_kernel
    types = {n: "i32" for n in fn.arg_names}
    types.update(q_ptr="*bf16", qidx_ptr="*i64", dig_ptr="*u8" if grid else "*bf16", r2t_ptr="*i32", rows_ptr="*i64",
                 nctx_ptr="*i32", hmask_ptr="*u8", keys_ptr="*i64", lo_ptr="*fp32", st_ptr="*fp32", gidx_ptr="*i64",
                 res_ptr="*i64", rkeys_ptr="*i64", qk_scale="fp32")
    d, page = 128, 32
    consts = {"HKV": 8, "G": 4, "BLOCK_G": 16, "D": d, "PAGE": page, "BLOCK_N": block_n, "KB": 32,
              "NB": 1024 // block_n, "AGG": 0, "HAS_MASK": True, "Q_BY_ROW": True, "F32_DOT": False,
              "HEADS_FAST": False, "SUB": sub, "STAGES": stages,
              "DSP": 8 * page * d // 4 if grid else 8 * 2 * d, "DSH": page * d // 4 if grid else 2 * d,
              "GRID": bool(grid), "BLOCK_PG": gc.grid_block_pages(page, block_n) if grid else 1, "HAS_GIDX": bool(grid),
              "FILL": fill, "KR": 64, "KRES": 48, "GRID_BG": gc.grid_block_g(4, grid == "int8"), "I8": grid == "int8"}
    k = compile_for_hopper(fn, types, consts, warps, stages)
    assert k.asm.get("cubin"), "no cubin"
    assert k.metadata.shared <= HOPPER_SMEM_PER_BLOCK, f"{consts} needs {k.metadata.shared} bytes of shared memory"
    if grid:  # wgmma with a warpgroup (4 warps), mma.sync below that
        ptx = k.asm["ptx"]
        assert "wgmma.mma_async" in ptx or "mma.sync.aligned" in ptx, "grid scores' products not on tensor cores"


@pytest.mark.parametrize("k,nb,margin,fill", [(32, 32, 0, 0), (48, 16, 0, 16), (48, 64, 0, 16), (36, 16, 4, 0),
                                              (64, 32, 0, 32)])
def test_fused_merge_kernel_compiles_for_hopper(k, nb, margin, fill):
    """The fused selection's merge (top-k of the blocks' keys, hysteresis or the over-fetch correction, residency)
    in the runtime's shapes: a budget of 32 pages with 16 over-fetched (k = 48, ``fill``), several key chunks."""
    from freekv_sglang.kernels import score_select as ss

    fn = ss._merge_select_kernel
    types = {n: "i32" for n in fn.arg_names}
    types.update(keys_ptr="*i64", nctx_ptr="*i64", res_ptr="*i64", rows_ptr="*i64", hmask_ptr="*u8", rslot_ptr="*i32",
                 rpage_ptr="*i32", cnt_ptr="*i64", rkeys_ptr="*i64")
    kb = max(16, 1 << (k + margin - 1).bit_length())
    consts = {"HKV": 8, "K": k, "KB": kb, "NB": nb, "CB": ss.merge_chunk_blocks(nb, kb), "BLOCK_N": 64, "PAGE": 32,
              "HAS_MASK": True, "COUNT": True, "MARGIN": margin, "KR": max(16, 1 << (k - 1).bit_length()), "FILL": fill}
    kern = compile_for_hopper(fn, types, consts, 4 if nb * kb <= 1024 else 8, 1)
    assert kern.asm.get("cubin"), "no cubin"
    assert kern.metadata.shared <= HOPPER_SMEM_PER_BLOCK
