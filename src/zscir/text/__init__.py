"""Text processing: the one spaCy loader, keyword / noun extraction, prompt templates."""

from zscir.text.nlp import load_spacy

__all__ = ["load_spacy"]
