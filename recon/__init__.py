"""FLAME-rigged 3D Gaussians: tracking, refinement, fitting, rendering, export."""
