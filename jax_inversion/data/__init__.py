"""Concept images, their captions and masks, the run plan (which tokens learn from which images, in which phase), and the cached latent dataset."""
