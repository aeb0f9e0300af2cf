"""What is built and usable on this machine, with versions (``python -m fedspa_kernels``)."""

from __future__ import annotations

import importlib.metadata
import platform

import torch

from . import _backends, _extension


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def system_info() -> dict:
    """Versions, devices, the native extension's state and, per backend, whether it is built and usable."""
    state = _extension.STATE
    usable = _backends.available_backends()
    built = {
        "reference": True,
        "cpp": _backends.cpp_built(),
        "cuda": _backends.cuda_built(),
        "triton": _backends.triton_installed(),
    }
    notes = {
        "reference": "pure PyTorch, any device",
        "cpp": "C++ CPU kernels" if built["cpp"] else f"extension not loaded: {state.error}",
        "cuda": (
            ("CUDA kernels" if usable["cuda"] else "compiled, but no CUDA device is visible")
            if built["cuda"]
            else (f"extension not loaded: {state.error}" if not state.loaded else "extension built without CUDA")
        ),
        "triton": (
            "not installed"
            if not built["triton"]
            else "CPU interpreter (TRITON_INTERPRET=1)"
            if _backends.triton_interpreted()
            else "GPU"
            if usable["triton"]
            else "no CUDA device (set TRITON_INTERPRET=1 to run on the CPU interpreter)"
        ),
    }
    return {
        "fedspa": _version("fedspa"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [],
        "cpu_threads": torch.get_num_threads(),
        "extension": {"loaded": state.loaded, "path": state.path, "error": state.error, "build": state.build_info},
        "backends": {name: {"built": built[name], "usable": usable[name], "note": notes[name]}
                     for name in _backends.BACKENDS},
    }


def format_system_info(info: dict | None = None) -> str:
    """A human-readable table of :func:`system_info`."""
    info = info or system_info()
    lines = [
        f"fedspa {info['fedspa']}  python {info['python']}  torch {info['torch']} (CUDA {info['torch_cuda']})  "
        f"triton {info['triton']}",
        f"platform: {info['platform']}; CPU threads: {info['cpu_threads']}; "
        f"CUDA devices: {', '.join(info['cuda_devices']) or 'none'}",
    ]
    ext = info["extension"]
    if ext["loaded"]:
        build = ext["build"]
        detail = (f"built for torch {build.get('torch')}, CUDA kernels: "
                  f"{'yes (archs ' + str(build.get('cuda_archs')) + ')' if build.get('cuda_kernels') else 'no'}"
                  if build else "no build record")
        lines.append(f"native extension: {ext['path']} ({detail})")
    else:
        lines.append(f"native extension: not loaded ({ext['error']})")
    lines.append(f"{'backend':<10} {'built':<6} {'usable':<7} note")
    for name, row in info["backends"].items():
        lines.append(f"{name:<10} {'yes' if row['built'] else 'no':<6} {'yes' if row['usable'] else 'no':<7} "
                     f"{row['note']}")
    return "\n".join(lines)
