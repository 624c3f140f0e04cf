"""The Gaussian diffusion process (noising, prediction conversions, losses, respacing) and the sampling
machinery that drives a denoiser through it under a block budget."""
