"""Training data: Fashion-MNIST IDX files, image folders and pre-encoded latents, as in-memory datasets."""
