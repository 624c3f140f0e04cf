"""Denoiser building blocks: the FPDM and DiT transformers (one file, shared blocks) and the SD-style VAE."""
