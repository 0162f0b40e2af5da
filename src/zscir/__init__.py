"""zscir: zero-shot composed image retrieval (PLI, LinCIR, CAM-masked textual inversion) on one stack.

The library (backbones, methods, data, metrics, retrieval) imports without Hydra; Hydra lives in
``zscir.cli`` and ``zscir/conf`` only.
"""

__version__ = "0.1.0"
