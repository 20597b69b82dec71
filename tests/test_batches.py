"""The input pipeline: per-row counts read vectorised from Arrow, and prefetched steps identical to the
ones built on the spot."""

from __future__ import annotations

import numpy as np
import torch
from raytest import run_cfg

from distsft.config import BatchPlan
from distsft.data.collate import collate, supervised_tokens
from distsft.data.sampler import rank_micro_batches, step_rows
from distsft.launcher.prepare import prepare_data
from distsft.model.flops import FlopsModel
from distsft.training.batches import Prefetcher, RowTable

FM = FlopsModel(dense_params=1000, full_attention=64, sliding_attention=32, window=16)


def prepared(tmp_path):
    return prepare_data(run_cfg(tmp_path, "data.max_seq_len=128")).train


def test_row_counts_from_arrow_equal_counting_row_by_row(tmp_path):
    rows = prepared(tmp_path)
    table = RowTable(rows, flops_of=FM.per_example)
    as_lists = [rows[i] for i in range(len(rows))]
    assert table.supervised.tolist() == [supervised_tokens([r]) for r in as_lists]
    assert table.tokens.tolist() == [len(r["input_ids"]) for r in as_lists]
    np.testing.assert_allclose(table.flops, [FM.flops(r["seq_lens"]) for r in as_lists], rtol=1e-12)
    lists = RowTable(as_lists, flops_of=FM.per_example)  # rows given as Python lists give the same
    assert lists.supervised.tolist() == table.supervised.tolist()


def test_prefetched_steps_are_the_steps_built_on_the_spot(tmp_path):
    rows = prepared(tmp_path)
    plan = BatchPlan(micro_batch_size=2, grad_accum_steps=2, world_size=2)
    table = RowTable(rows, flops_of=FM.per_example)
    feed = Prefetcher(table, plan, rank=1, seed=3, pad_id=0, varlen=True, pin=False)
    try:
        for step in range(3):
            got = feed.get(step, then=step + 1)
            global_rows = step_rows(len(rows), plan, step, 3)
            assert got.global_supervised == sum(supervised_tokens([rows[i]]) for i in global_rows)
            mine = rank_micro_batches(global_rows, plan, 1)
            assert len(got.micro_batches) == 2
            for indices, batch in zip(mine, got.micro_batches, strict=True):
                expected = collate([rows[i] for i in indices], 0, varlen=True)
                for key, value in expected.items():
                    if isinstance(value, torch.Tensor):
                        assert torch.equal(batch[key], value), key
                    else:
                        assert batch[key] == value, key
    finally:
        feed.close()
