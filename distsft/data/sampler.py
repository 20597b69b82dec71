"""Which rows each worker trains on in each optimizer step.

The rows of global step ``s`` depend only on the seed and the global batch size, never on the number of
workers or on how the batch is split into micro-batches; so 1 worker x accumulation 4 and 4 workers x
accumulation 1 see the same data, and a resumed run can jump straight to step ``s``. Every rank gets
exactly ``micro_batch_size * grad_accum_steps`` rows, so no collective ever waits on a rank that ran out.
"""

from __future__ import annotations

import math
import random

from distsft.config import BatchPlan
from distsft.errors import DataError


def steps_per_epoch(num_rows: int, plan: BatchPlan) -> int:
    """Full global batches per epoch (the remainder of an epoch's rows is left out, as with drop_last)."""
    steps = num_rows // plan.global_batch
    if steps == 0:
        raise DataError(
            f"the data has {num_rows} rows but one optimizer step needs {plan.global_batch} "
            f"(micro_batch_size {plan.micro_batch_size} x grad_accum_steps {plan.grad_accum_steps} x "
            f"{plan.data_parallel} data-parallel workers); lower the batch or add data"
        )
    return steps


def total_steps(num_rows: int, plan: BatchPlan, max_steps: int, epochs: float) -> int:
    if max_steps > 0:
        return max_steps
    return max(1, math.floor(epochs * steps_per_epoch(num_rows, plan)))


def step_rows(num_rows: int, plan: BatchPlan, step: int, seed: int) -> list[int]:
    """The global batch of ``step`` (0-based): a slice of that epoch's seeded permutation."""
    spe = steps_per_epoch(num_rows, plan)
    epoch, k = divmod(step, spe)
    order = list(range(num_rows))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[k * plan.global_batch : (k + 1) * plan.global_batch]


def rank_micro_batches(global_rows: list[int], plan: BatchPlan, rank: int) -> list[list[int]]:
    """This rank's share of a global batch, cut into ``grad_accum_steps`` micro-batches; the workers of a
    sequence-parallel group get the same rows (each trains on its slice of their tokens)."""
    group = plan.data_rank(rank)
    mine = global_rows[group * plan.rows_per_rank : (group + 1) * plan.rows_per_rank]
    m = plan.micro_batch_size
    return [mine[i : i + m] for i in range(0, len(mine), m)]
