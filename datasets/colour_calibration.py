"""NeRSemble's per-camera colour calibration, computed as ``nersemble-data`` defines it, with colour-science.

``calibration/color_calibration.json`` maps serial -> a colour correction matrix (CCM) of shape (3, terms): the
image is sRGB-decoded to linear RGB, expanded to the Cheung et al. (2004) polynomial with ``terms`` terms
(3: RGB, 4: RGB + 1, ... as colour-science defines them), multiplied by the CCM and sRGB-encoded again.
"""

from __future__ import annotations

import colour
import numpy as np
from colour.characterisation import apply_matrix_colour_correction_Cheung2004

CHEUNG2004_TERMS = (
    3,
    4,
    5,
    7,
    8,
    10,
    11,
    14,
    16,
    17,
    19,
    20,
    22,
    35,
)  # the expansions colour-science defines


def ccm_shape_error(matrix: np.ndarray) -> str | None:
    """Why ``matrix`` is not a usable CCM, or None."""
    if matrix.ndim != 2 or matrix.shape[0] != 3 or matrix.shape[1] not in CHEUNG2004_TERMS:
        return f"expected a (3, terms) colour correction matrix with terms in {CHEUNG2004_TERMS}, got shape {matrix.shape}"
    if not np.all(np.isfinite(matrix)):
        return "colour correction matrix has non-finite entries"
    return None


def correct_colour(image: np.ndarray, ccm: np.ndarray) -> np.ndarray:
    """Colour-correct an RGB image [..., 3] (uint8, or float in [0, 1]); returns the same kind.

    uint8 results are clipped and truncated to integers exactly as ``nersemble_data`` does.
    """
    as_uint8 = image.dtype == np.uint8
    rgb = image / 255.0 if as_uint8 else np.asarray(image, np.float64)
    linear = colour.cctf_decoding(rgb)  # sRGB -> linear
    corrected = apply_matrix_colour_correction_Cheung2004(linear, ccm, terms=ccm.shape[-1])
    encoded = colour.cctf_encoding(corrected)
    if as_uint8:
        return np.clip(encoded * 255, 0, 255).astype(np.uint8)
    return encoded
