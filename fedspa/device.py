"""The ``device`` setting: ``auto`` (CUDA when a device is visible, else the CPU), ``cpu``, ``cuda``, ``cuda:N``."""

from __future__ import annotations

import re

import torch

_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def check_device_string(text: str) -> None:
    """Raises ValueError unless `text` is one of the accepted spellings (availability is checked at run time)."""
    if not isinstance(text, str) or not _PATTERN.match(text):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {text!r}")


def resolve_device(text: str) -> torch.device:
    """The torch device a run uses.

    Raises:
        ValueError: a malformed setting, CUDA asked for where no CUDA device is visible, or an index past the last.
    """
    check_device_string(text)
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device={text}: no CUDA device is visible here (torch {torch.__version__}, "
                         f"CUDA build: {torch.version.cuda or 'no'}); use device=cpu or device=auto")
    index = int(text.split(":")[1]) if ":" in text else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"device={text}: there are {count} CUDA device(s) (cuda:0 to cuda:{count - 1})")
    return torch.device("cuda", index)
