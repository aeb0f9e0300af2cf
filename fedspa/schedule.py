"""FedSpa's mask-update schedule: how many weights each layer drops (and regrows) in a round.

The drop fraction anneals with a cosine from ``initial`` to 0 over the run (as in RigL and DisPFL):
    alpha_t = (alpha_0 / 2) * (1 + cos(pi * t / T))
and layer l drops k_l = round(alpha_t * nnz_l) of its nnz_l active weights (never more than it can regrow).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def drop_fraction(round_index: int, total_rounds: int, initial: float = 0.5) -> float:
    """The cosine-annealed drop fraction of round `round_index` (0-based) of `total_rounds`.

    Raises:
        ValueError: total_rounds < 1, round_index outside [0, total_rounds], initial outside [0, 1].
    """
    if total_rounds < 1:
        raise ValueError(f"drop_fraction: total_rounds must be >= 1, got {total_rounds}")
    if not 0 <= round_index <= total_rounds:
        raise ValueError(f"drop_fraction: round_index must lie in [0, {total_rounds}], got {round_index}")
    if not 0.0 <= initial <= 1.0:
        raise ValueError(f"drop_fraction: initial must lie in [0, 1], got {initial}")
    return 0.5 * initial * (1.0 + math.cos(math.pi * round_index / total_rounds))


def drop_counts(active: Sequence[int], sizes: Sequence[int], fraction: float) -> list[int]:
    """k_l = round(fraction * active_l), capped by the inactive positions (size_l - active_l) it can regrow into.

    Args:
        active: nnz of each layer.
        sizes: number of weights of each layer.
        fraction: the drop fraction of this round, in [0, 1].
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"drop_counts: fraction must lie in [0, 1], got {fraction}")
    if len(active) != len(sizes):
        raise ValueError(f"drop_counts: {len(active)} active counts for {len(sizes)} layers")
    counts = []
    for l, (nnz, size) in enumerate(zip(active, sizes)):
        if not 0 <= nnz <= size:
            raise ValueError(f"drop_counts: layer {l} has {nnz} active weights of {size}")
        counts.append(min(int(round(fraction * nnz)), size - nnz))
    return counts
