"""Backend registry: availability, explicit choice, the context manager, fallbacks, the info commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import fedspa_kernels as fk
from fedspa_kernels import _backends

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(args: list[str], env_updates: dict[str, str | None] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for key, value in (env_updates or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_available_backends_shape():
    available = fk.available_backends()
    assert list(available) == ["reference", "cpp", "cuda", "triton"]
    assert available["reference"] is True
    assert all(isinstance(v, bool) for v in available.values())
    if not torch.cuda.is_available():
        assert available["cuda"] is False


def test_explicit_backend_errors():
    idx, val = [torch.tensor([0, 1])], [torch.ones(2)]
    with pytest.raises(ValueError, match="unknown backend 'cublas'"):
        fk.scatter_add_aggregate(idx, val, 4, backend="cublas")
    with pytest.raises(fk.BackendUnavailableError, match="cuda backend runs on CUDA tensors, got cpu"):
        fk.scatter_add_aggregate(idx, val, 4, backend="cuda")
    meta = [torch.tensor([0, 1], device="meta")], [torch.ones(2, device="meta")]
    with pytest.raises(fk.BackendUnavailableError, match="cpp backend runs on CPU tensors"):
        fk.scatter_add_aggregate(*meta, 4, backend="cpp")
    with pytest.raises(fk.BackendUnavailableError, match="triton backend does not run on meta"):
        fk.scatter_add_aggregate(*meta, 4, backend="triton")


def test_use_backend_context_and_nesting():
    idx, val = [torch.tensor([0, 1])], [torch.ones(2)]
    with fk.use_backend("cuda"):
        with pytest.raises(fk.BackendUnavailableError):
            fk.scatter_add_aggregate(idx, val, 4)
        with fk.use_backend("reference"):
            assert _backends.resolve_backend(None, torch.device("cpu"), "scatter_add_aggregate") == "reference"
            fk.scatter_add_aggregate(idx, val, 4)
        with fk.use_backend(None):
            assert _backends.resolve_backend(None, torch.device("cpu"), "scatter_add_aggregate") != "cuda"
    with pytest.raises(ValueError, match="unknown backend"):
        with fk.use_backend("fast"):
            pass
    # an explicit backend argument wins over the context
    with fk.use_backend("cuda"):
        fk.scatter_add_aggregate(idx, val, 4, backend="reference")


def test_automatic_choice():
    cpu = torch.device("cpu")
    expected = "cpp" if fk.available_backends()["cpp"] else "reference"
    assert _backends.resolve_backend(None, cpu, "scatter_add_aggregate") == expected
    assert _backends.resolve_backend(None, torch.device("meta"), "scatter_add_aggregate") == "reference"


REQUIRED = [name.strip() for name in os.environ.get("FEDSPA_REQUIRE_BACKENDS", "").split(",") if name.strip()]


@pytest.mark.parametrize(
    "name",
    REQUIRED or [pytest.param("none", marks=pytest.mark.skip(reason="FEDSPA_REQUIRE_BACKENDS is not set"))],
)
def test_required_backend_is_there(name):
    """CI sets FEDSPA_REQUIRE_BACKENDS=cpp,cuda-build,triton: a build that silently lost a backend fails here."""
    if name == "cuda-build":
        assert _backends.cuda_built(), f"CUDA kernels were not compiled into the extension: {fk.system_info()}"
    else:
        assert fk.available_backends()[name], f"backend {name} is not usable: {fk.format_system_info()}"


def test_everything_works_without_the_extension():
    code = (
        "import torch, fedspa_kernels as fk\n"
        "assert fk.available_backends()['cpp'] is False, fk.available_backends()\n"
        "s, c = fk.scatter_add_aggregate([torch.tensor([0, 2, 2])], [torch.tensor([1., 2., 3.])], 4)\n"
        "assert s.tolist() == [1., 0., 5., 0.] and c.tolist() == [1., 0., 2., 0.], (s, c)\n"
        "s2, _ = torch.ops.fedspa.scatter_add_aggregate([torch.tensor([1])], [torch.ones(1)], torch.ones(1), 3, False)\n"
        "assert s2.tolist() == [0., 1., 0.]  # the default kernel is the reference\n"
        "try:\n"
        "    fk.scatter_add_aggregate([torch.tensor([0])], [torch.ones(1)], 4, backend='cpp')\n"
        "    raise SystemExit('cpp should be unavailable')\n"
        "except fk.BackendUnavailableError as e:\n"
        "    assert 'FEDSPA_DISABLE_EXTENSION' in str(e), e\n"
        "print('ok')\n"
    )
    result = _run(["-c", code], {"FEDSPA_DISABLE_EXTENSION": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_info_commands():
    table = _run(["-m", "fedspa_kernels"])
    assert table.returncode == 0, table.stderr
    for word in ("backend", "reference", "cpp", "cuda", "triton", f"torch {torch.__version__}"):
        assert word in table.stdout
    facts = json.loads(_run(["-m", "fedspa_kernels", "--json"]).stdout)
    assert facts["torch"] == torch.__version__
    assert set(facts["backends"]) == {"reference", "cpp", "cuda", "triton"}
    assert facts["backends"]["cpp"]["usable"] == fk.available_backends()["cpp"]
    cli = _run(["-m", "fedspa.cli", "info", "--json"])
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["backends"] == facts["backends"]


def test_triton_kernels_compile_for_sm80_and_sm90():
    """The interpreter cannot catch GPU code generation errors: compile every kernel variant for real."""
    pytest.importorskip("triton")
    result = _run(["-m", "fedspa_kernels.triton_kernels.compile_check"], {"TRITON_INTERPRET": None})
    assert result.returncode == 0, result.stderr[-4000:]
    assert "compiled" in result.stdout
