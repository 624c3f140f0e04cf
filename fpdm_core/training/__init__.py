"""The S-JFB training loop and its distributed (torchrun / DDP) helpers."""
