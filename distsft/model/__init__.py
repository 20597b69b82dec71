"""Models without ranks or engines: ``loading`` (tokenizer, config, weights, the demo), ``hub`` (hub ids
checked in seconds), ``traits`` (what a family needs, read from its config and class), ``attention`` (the
varlen kernel), ``flops``, ``lora`` (adapters, QLoRA), ``generate``.

May import ``config``, ``errors`` and ``host``; never torch.distributed, DeepSpeed's engine or Ray (under
ZeRO-3 the caller keeps DeepSpeed's config alive while ``loading`` builds the model).
"""
