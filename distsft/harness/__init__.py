"""Benchmarks of a model directory through lm-evaluation-harness (``distsft eval --tasks``), offline:
``tasks`` (task files found, checked to read only local data, their relative paths made absolute),
``runner`` (lm-eval on a model loaded here, the hub switched off), ``compare`` (the fine-tuned model beside
its base: one row per task and metric), and ``tasks/`` (the shipped example tasks, to copy).

``lm_eval`` is an optional extra (``pip install 'distsft[eval]'``): nothing here imports it at module level.
May import ``errors``, ``host``, ``config`` and ``model``; never the launcher, the training loop,
torch.distributed or Ray.
"""
