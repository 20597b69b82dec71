"""The worker: what runs on every rank, the same code for ``--local`` and each Ray worker.

``loop`` (set up a run, run its steps), ``step`` (one optimizer step and its figures), ``engine`` (the
DeepSpeed plan, JSON and engine; precision), ``distributed`` (the process group and the loop's own
collectives), ``batches`` (the prefetched input pipeline), ``loss`` (the token-weighted objective and the
kernel choice), ``evaluate``, ``sequence_parallel`` (Ulysses), ``tiling`` (tiled MLPs), ``profiling``.

May import ``config``, ``data``, ``model``, ``checkpoint``, ``metrics`` and ``host``; never ``launcher``
or Ray: where it runs comes in a ``WorkerContext``.
"""
