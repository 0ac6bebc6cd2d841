"""Reading and writing files, one place for each kind: atomic writes (``atomic``), images and the float <-> image
conversion (``images``; torch tensors in ``tensors``), EXR (``exr``), video (``video``), JSON and YAML
(``json_yaml``)."""
