"""DRDD (Decoupled Residual Denoising Diffusion) in JAX/Flax."""
