"""Triton kernels compiled for Hopper (sm_90) on a machine without a GPU.

Triton's CPU interpreter checks a kernel's arithmetic but not what only the compiler sees: shapes
``tl.dot`` accepts, layouts, and the shared memory a pipelined configuration needs. This compiles
the Triton split decode (its configurations in ``launch/kernel_bench/`` and the runtime's) to a
cubin for sm_90 with Triton's bundled ``ptxas`` and checks that each fits an H100/H200 SM's shared
memory (227 KiB per block), so a configuration that could not launch is caught before a GPU run.
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
