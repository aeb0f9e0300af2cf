"""Compiles every Triton kernel of the package for real NVIDIA targets, without a GPU.

``python -m fedspa_kernels.triton_kernels.compile_check [--arch 80 --arch 90]`` runs Triton's full pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> cubin via ptxas) for each kernel and dtype combination the launchers use,
so CI on a CPU-only machine catches GPU code generation errors that the interpreter cannot see. It must run
without TRITON_INTERPRET (interpreted kernels do not compile).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

KERNEL_MODULES = (
    "fedspa_kernels.triton_kernels.scatter_add_aggregate",
    "fedspa_kernels.triton_kernels.spmm",
    "fedspa_kernels.triton_kernels.sddmm",
    "fedspa_kernels.triton_kernels.prune_regrow",
    "fedspa_kernels.triton_kernels.sparse_conv2d",
    "fedspa_kernels.triton_kernels.transpose_copy",
)


def compile_all(archs: tuple[int, ...] = (80, 90)) -> int:
    """Compiles every (kernel, signature) of every module for each arch; returns the number compiled."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (interpreted kernels do not compile)")
    import triton
    from triton.backends.compiler import GPUTarget

    compiled = 0
    for name in KERNEL_MODULES:
        module = importlib.import_module(name)
        for kernel, signature, constexprs in module.compile_specs():
            for arch in archs:
                source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
                try:
                    binary = triton.compile(source, target=GPUTarget("cuda", arch, 32))
                except Exception as exc:
                    raise RuntimeError(f"{name}.{kernel.fn.__name__} {signature} {constexprs} sm_{arch}: {exc}") from exc
                if not binary.asm.get("cubin"):
                    raise RuntimeError(f"{kernel.fn.__name__} sm_{arch}: no cubin produced")
                compiled += 1
    return compiled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="SM version, e.g. 90 (default: 80 and 90)")
    args = parser.parse_args(argv)
    count = compile_all(tuple(args.arch or (80, 90)))
    print(f"compiled {count} Triton kernel variants")
    return 0


if __name__ == "__main__":
    sys.exit(main())
