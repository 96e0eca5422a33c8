"""histodiff: synthetic augmentation of pathology tiles with latent diffusion on Ray."""

__version__ = "0.1.0"
