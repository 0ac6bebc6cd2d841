"""Head model, cameras, rasterizer, readers, procedural data, packing and loaders."""
