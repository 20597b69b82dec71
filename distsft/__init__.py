"""distsft: distributed supervised fine-tuning of causal language models on Ray + DeepSpeed."""

__version__ = "0.1.0"
