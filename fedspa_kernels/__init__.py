"""fedspa_kernels: sparse kernels for sparse-to-sparse training and federated aggregation.

Every op has a pure-PyTorch reference, a C++ CPU kernel, a CUDA kernel and a Triton kernel, registered with
torch.library under the ``fedspa`` namespace. Pick one per call with ``backend=...`` or for a block with
:func:`use_backend`; :func:`available_backends` says which can run here.
"""

from __future__ import annotations

from . import _library  # noqa: F401  (the fedspa namespace)
from .ops import scatter_add_aggregate as _scatter_add_aggregate_op  # noqa: F401  (defines the schemas)
from .ops import spmm as _spmm_op  # noqa: F401
from .ops import sddmm as _sddmm_op  # noqa: F401
from .ops import prune_regrow as _prune_regrow_op  # noqa: F401
from .ops import sparse_conv2d as _sparse_conv2d_op  # noqa: F401
from .ops import check_csr as _check_csr_op  # noqa: F401
from .ops import transpose_copy as _transpose_copy_op  # noqa: F401
from . import _extension

_extension.load()  # registers the C++/CUDA kernels; a missing extension leaves the references in place

from ._backends import (  # noqa: E402
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    use_backend,
)
from .sparse_matrix import SparseMatrix  # noqa: E402
from ._info import format_system_info, system_info  # noqa: E402
from .ops.prune_regrow import PruneRegrowResult, prune_regrow, prune_regrow_reference  # noqa: E402
from .ops.sddmm import masked_matmul, sddmm, sddmm_reference  # noqa: E402
from .ops.sparse_conv2d import sparse_conv2d, sparse_conv2d_reference  # noqa: E402
from .ops.spmm import sparse_linear, spmm, spmm_reference  # noqa: E402
from .ops.transpose_copy import (  # noqa: E402
    batch_last,
    nchw_contiguous,
    transpose_copy,
    transpose_copy_reference,
)
from .ops.scatter_add_aggregate import (  # noqa: E402
    scatter_add_aggregate,
    scatter_add_aggregate_reference,
    scatter_add_average,
    scatter_add_average_reference,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "PruneRegrowResult",
    "SparseMatrix",
    "available_backends",
    "batch_last",
    "format_system_info",
    "masked_matmul",
    "nchw_contiguous",
    "prune_regrow",
    "prune_regrow_reference",
    "scatter_add_aggregate",
    "scatter_add_aggregate_reference",
    "scatter_add_average",
    "scatter_add_average_reference",
    "sddmm",
    "sddmm_reference",
    "sparse_conv2d",
    "sparse_conv2d_reference",
    "sparse_linear",
    "spmm",
    "spmm_reference",
    "system_info",
    "transpose_copy",
    "transpose_copy_reference",
    "use_backend",
]
