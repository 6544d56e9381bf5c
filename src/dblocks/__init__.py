"""DiffusionBlocks: train a residual transformer as B independently trained blocks, each denoising one
interval of a diffusion process (arXiv 2506.14202)."""

__version__ = "0.1.0"
