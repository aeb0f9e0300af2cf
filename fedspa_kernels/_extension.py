"""Loading of the native extension fedspa_kernels._C (C++ CPU and CUDA kernels).

Importing the module runs its TORCH_LIBRARY_IMPL registrations. When it is missing or fails to load (not
built, built against another torch), every op still works on its pure-PyTorch reference; one warning (logger
``fedspa_kernels``) says why and how to fix it, and the reason is kept for `python -m fedspa_kernels`. Set
FEDSPA_DISABLE_EXTENSION=1 to skip loading it on purpose (no warning).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("fedspa_kernels")


@dataclass
class ExtensionState:
    loaded: bool = False
    path: str | None = None
    error: str | None = None
    build_info: dict = field(default_factory=dict)


STATE = ExtensionState()


def load() -> ExtensionState:
    """Imports fedspa_kernels._C once; never raises."""
    if STATE.loaded or STATE.error is not None:
        return STATE
    info_path = Path(__file__).with_name("_build_info.json")
    if info_path.exists():
        try:
            STATE.build_info = json.loads(info_path.read_text())
        except (OSError, ValueError):
            STATE.build_info = {}
    if os.environ.get("FEDSPA_DISABLE_EXTENSION", "0") == "1":
        STATE.error = "disabled by FEDSPA_DISABLE_EXTENSION=1"
        return STATE
    try:
        module = importlib.import_module("fedspa_kernels._C")
    except (ImportError, OSError) as exc:  # not built, or built against another torch
        STATE.error = f"{type(exc).__name__}: {exc}"
        built_for = STATE.build_info.get("torch")
        log.warning("fedspa_kernels: the native kernels did not load (%s)%s; every op runs on its pure-PyTorch "
                    "reference, 5-11x slower on the CPU. Rebuild against this torch with `pip install "
                    "--no-build-isolation -e .` (see `python -m fedspa_kernels`), or set FEDSPA_DISABLE_EXTENSION=1 "
                    "to run on the references on purpose.", STATE.error,
                    f", built for torch {built_for}" if built_for else "")
        return STATE
    STATE.loaded = True
    STATE.path = getattr(module, "__file__", None)
    return STATE
