"""Reading and writing files, one place for each kind: atomic writes (``atomic``), images (``images``), EXR
(``exr``) and video (``video``)."""
