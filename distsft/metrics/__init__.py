"""A run's figures: ``records`` (a worker's ``RecordSender`` -> the driver's ``RecordSink`` -> ``merge``),
``jsonl`` (``metrics.jsonl``, the file every view is drawn from), ``display`` (progress, TensorBoard,
W&B, MLflow), ``summary`` (the end of a run and the loss curve), ``console`` (what a person sees).

May import ``config``, ``errors`` and ``host``; never the launcher, the training loop or Ray.
"""
