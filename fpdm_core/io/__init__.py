"""What goes to and comes from disk: run checkpoints, VAE weights and official FPDM/DiT checkpoints."""
