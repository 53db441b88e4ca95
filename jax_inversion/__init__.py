"""jax_inversion: learn personalized concepts as new token embeddings of Stable Diffusion models."""
