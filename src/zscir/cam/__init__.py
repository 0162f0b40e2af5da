"""Class activation maps of a word in an image (Grad-CAM on CLIP ViTs), region masks, and a CAM cache."""

from zscir.cam.cache import CamCache, cache_namespace, pixel_stats
from zscir.cam.gradcam import CamSpec, grad_cams, minmax, prompt_features, target_layer, upsample_cams
from zscir.cam.masks import MODES, REGIONS, mask_pixels, masked_features, visible
from zscir.cam.provider import NounCams

__all__ = [
    "MODES",
    "REGIONS",
    "CamCache",
    "CamSpec",
    "NounCams",
    "cache_namespace",
    "grad_cams",
    "mask_pixels",
    "masked_features",
    "minmax",
    "pixel_stats",
    "prompt_features",
    "target_layer",
    "upsample_cams",
    "visible",
]
