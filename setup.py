"""Build of fedspa_kernels._C: C++ CPU kernels always, CUDA kernels when possible.

Environment switches:
  FEDSPA_BUILD_CUDA=auto|0|1  auto (default): build the CUDA kernels when torch is a CUDA build and a CUDA
                              toolkit is found; 0: never; 1: always, failing loudly when impossible.
  CUDA_HOME                   the CUDA toolkit (must hold bin/nvcc and include/cuda_runtime.h).
  TORCH_CUDA_ARCH_LIST        GPU architectures (default "8.0;9.0").
  MAX_JOBS                    parallel compile jobs (honoured by torch's ninja build).
  DEBUG=1                     -O0 -g instead of -O3.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _cuda_toolkit_ok(home: str | None) -> bool:
    return bool(home) and os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
        os.path.join(home, "include", "cuda_runtime.h")
    )


def _locate_cuda_home() -> str | None:
    """CUDA_HOME if set, else the toolkit behind `nvcc` on PATH (resolving wrappers), else /usr/local/cuda."""
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        return explicit
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if _cuda_toolkit_ok(home):
            return home
    return None


def _build_mode() -> str:
    mode = os.environ.get("FEDSPA_BUILD_CUDA", "auto").strip().lower()
    aliases = {"1": "1", "true": "1", "on": "1", "yes": "1", "0": "0", "false": "0", "off": "0", "no": "0"}
    if mode == "auto":
        return mode
    if mode not in aliases:
        raise SystemExit(f"FEDSPA_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    return aliases[mode]


MODE = _build_mode()
CUDA_HOME_FOUND = _locate_cuda_home() if MODE != "0" else None
if CUDA_HOME_FOUND:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported; a bare `nvcc` wrapper on PATH would
    # otherwise make it guess the wrong toolkit root.
    os.environ["CUDA_HOME"] = CUDA_HOME_FOUND
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)

import torch  # noqa: E402  (after CUDA_HOME is fixed)
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _decide_cuda() -> tuple[bool, str]:
    if MODE == "0":
        return False, "disabled by FEDSPA_BUILD_CUDA=0"
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    if not _cuda_toolkit_ok(CUDA_HOME_FOUND):
        problems.append(f"no CUDA toolkit found (CUDA_HOME={CUDA_HOME_FOUND!r}; need bin/nvcc and include/cuda_runtime.h)")
    if problems:
        if MODE == "1":
            raise SystemExit("FEDSPA_BUILD_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(problems))
        return False, "; ".join(problems)
    return True, f"CUDA {torch.version.cuda}, toolkit {CUDA_HOME_FOUND}, archs {os.environ['TORCH_CUDA_ARCH_LIST']}"


def _extensions() -> tuple[list, dict]:
    with_cuda, why = _decide_cuda()
    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx_flags = opt + ["-fopenmp", "-fvisibility=hidden"]
    macros = [("Py_LIMITED_API", "0x030A0000")]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        macros.append(("FEDSPA_WITH_CUDA", "1"))
        nvcc_flags = opt + ["-lineinfo", "--expt-relaxed-constexpr"]
        ext = CUDAExtension(
            "fedspa_kernels._C",
            sources,
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    else:
        ext = CppExtension(
            "fedspa_kernels._C",
            sources,
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    info = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_kernels": with_cuda,
        "cuda_reason": why,
        "cuda_archs": os.environ["TORCH_CUDA_ARCH_LIST"] if with_cuda else None,
        "debug": debug,
    }
    print(f"fedspa: building the C++ CPU kernels; CUDA kernels: {'yes' if with_cuda else 'no'} ({why})")
    return [ext], info


class _Build(BuildExtension):
    """BuildExtension that also records what was built, for `python -m fedspa_kernels`."""

    def run(self) -> None:
        super().run()
        path = os.path.join(ROOT, "fedspa_kernels", "_build_info.json")
        with open(path, "w") as f:
            json.dump(BUILD_INFO, f, indent=2)
        if not self.inplace and self.build_lib:
            target = os.path.join(self.build_lib, "fedspa_kernels")
            if os.path.isdir(target):
                shutil.copy(path, target)


EXTENSIONS, BUILD_INFO = _extensions()

setup(
    ext_modules=EXTENSIONS,
    cmdclass={"build_ext": _Build},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
