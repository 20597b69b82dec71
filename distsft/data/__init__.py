"""Raw rows to packed, prompt-masked training rows: ``sources`` and ``chunks`` (what to read, cut into
chunks), ``formats`` (a row to turns), ``tokenize`` (chat template, assistant-only labels, length policy),
``packing``, ``passes`` (the two passes over a chunk and the local runner), ``prepare`` (the cached
result), ``collate`` and ``sampler`` (batches of a step), ``inspect`` (``prepare --show``).

May import ``config``, ``errors`` and ``host``; never torch.distributed, Ray or the training code.
"""
