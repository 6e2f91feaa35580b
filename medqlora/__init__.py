"""medqlora: declarative QLoRA fine-tuning of medical language models, driven by DVC."""
__version__ = "0.1.0"
