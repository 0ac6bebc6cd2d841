"""Joint image+normal diffusion: model, training, sampling."""
