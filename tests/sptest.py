"""Worker processes for the sequence-parallel equivalence tests (importable by torch.multiprocessing)."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist


def rows_for(vocab: int, max_len: int):
    """Two packed rows: examples longer than the sliding window, and a shorter row that gets padding."""
    from isolation import make_examples

    from distsft.data.packing import pack

    long = pack(make_examples([40, 23, 9, 33], vocab), max_len=max_len, seed=0)
    short = pack(make_examples([17, 12], vocab), max_len=max_len, seed=0)
    assert len(long) == 1 and len(short) == 1
    return [long[0], short[0]]


def loss_and_grads(model, batch):
    from distsft.training.loss import token_loss_sum

    model.zero_grad()
    parts = token_loss_sum(model, batch, mode="plain")
    parts.loss_sum.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    return parts.loss_sum.detach(), parts.tokens, grads


def compare(rank: int, world: int, port: int, cases: list[tuple[str, str, dict]], out: str) -> None:
    """Each case (family, core attention, config overrides): the loss and gradients of the rows split over
    ``world`` workers (summed over them) against one process running the whole rows."""
    from families import family_model

    from distsft.data.collate import collate
    from distsft.training import sequence_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    sp = sequence_parallel.new_groups(world)
    results = []
    for family, core, overrides in cases:
        name = sequence_parallel.register(sp, core)
        model = family_model(family, seed=0, attn=name, **overrides)
        rows = rows_for(model.config.vocab_size, 112)
        batch = sequence_parallel.shard_batch(collate(rows, 0, varlen=True, multiple_of=world), world, rank)
        loss, tokens, grads = loss_and_grads(model, batch)
        summed = torch.stack([loss, torch.tensor(float(tokens))])
        dist.all_reduce(summed)
        for g in grads.values():
            dist.all_reduce(g)
        if rank == 0:
            ref_model = family_model(family, seed=0, attn=core, **overrides)
            ref_batch = collate(rows, 0, varlen=False)
            ref_loss, ref_tokens, ref_grads = loss_and_grads(ref_model, ref_batch)
            grad_rel = max(
                ((grads[k] - g).abs().max() / g.abs().max().clamp(min=1e-12)).item() for k, g in ref_grads.items()
            )
            results.append(
                {
                    "case": f"{family}/{core}/{overrides}",
                    "loss": summed[0].item(),
                    "ref_loss": ref_loss.item(),
                    "tokens": summed[1].item(),
                    "ref_tokens": ref_tokens,
                    "grad_rel": grad_rel,
                    "grads": sorted(grads) == sorted(ref_grads),
                }
            )
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()
