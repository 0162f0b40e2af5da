"""SEARLE's two language inputs: a concept vocabulary and sentences ("phrases") about each concept.

* Vocabulary: a CSV with a ``DisplayName`` column, as Open Images' ``oidv7-class-descriptions.csv``
  (``LabelName,DisplayName``) that SEARLE uses; the synthetic world writes its own in the same format.
* Phrases: a pickled ``{concept: [phrase, ...]}``, the format of SEARLE's released
  ``GPT_phrases/<name>/concept_to_phrases.pkl`` (sentences "a photo of {concept} that ..." sampled from a
  language model); the synthetic world writes its own, built from its words.

A pickle can run code when loaded; :func:`load_phrases` accepts only plain containers of strings and
refuses anything else.
"""

from __future__ import annotations

import csv
import io
import pickle
from dataclasses import dataclass
from pathlib import Path

from zscir.utils.images import DatasetLayoutError


class _PlainUnpickler(pickle.Unpickler):
    """Builds dicts, lists, tuples and strings only: a pickle naming any class or function is refused."""

    def find_class(self, module: str, name: str) -> object:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a phrase file holds only strings")


def load_vocabulary(path: str | Path) -> list[str]:
    """Concept names (the ``DisplayName`` column, stripped, first occurrence kept, empty names dropped).

    Raises:
        DatasetLayoutError: the file is missing or has no ``DisplayName`` column.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise DatasetLayoutError(
            f"concept vocabulary {file} does not exist: SEARLE reads Open Images' class descriptions "
            "(oidv7-class-descriptions.csv, columns LabelName,DisplayName), or the synthetic world's "
            "concepts/class-descriptions.csv"
        )
    reader = csv.DictReader(io.StringIO(file.read_text(encoding="utf-8")))
    if "DisplayName" not in (reader.fieldnames or []):
        raise DatasetLayoutError(f"{file}: no DisplayName column (columns: {reader.fieldnames})")
    names = [str(row["DisplayName"] or "").strip() for row in reader]
    return list(dict.fromkeys(n for n in names if n))


def load_phrases(path: str | Path) -> dict[str, list[str]]:
    """``{concept: [phrase, ...]}`` from a pickled dict (keys stripped).

    Raises:
        DatasetLayoutError: the file is missing.
        ValueError: it is not a dict of lists of strings (or names any class or function).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise DatasetLayoutError(
            f"phrase file {file} does not exist: SEARLE reads concept_to_phrases.pkl (its GPT phrases, "
            "released with the official code), or the synthetic world's concepts/concept_to_phrases.pkl"
        )
    try:
        data = _PlainUnpickler(io.BytesIO(file.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise ValueError(f"{file}: not a pickled {{concept: [phrase, ...]}} ({err})") from err
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, (list, tuple)) and all(isinstance(p, str) for p in v)
        for k, v in data.items()
    ):
        raise ValueError(f"{file}: expected a dict of concept -> list of phrases (strings)")
    return {k.strip(): list(v) for k, v in data.items()}


@dataclass
class Concepts:
    """The concepts an image can be associated with, and the phrases of each.

    ``names`` keeps the vocabulary's order (concept association ranks all of them); ``phrases`` holds the
    usable concepts only: those with phrases, each of which contains the concept (SEARLE drops a concept
    if any of its phrases lacks it, ``src/train_phi.py`` "filtering problematic concepts").
    """

    names: list[str]
    phrases: dict[str, list[str]]

    @classmethod
    def load(cls, vocabulary: str | Path, phrases: str | Path) -> Concepts:
        """Raises: DatasetLayoutError / ValueError (see the loaders), or ValueError when no concept of the
        vocabulary has usable phrases."""
        names = load_vocabulary(vocabulary)
        table = load_phrases(phrases)
        usable = {n: table[n] for n in names if table.get(n) and all(n in p for p in table[n])}
        if not usable:
            raise ValueError(
                f"no concept of {vocabulary} has phrases in {phrases} that all contain it; are the two "
                "files from the same source?"
            )
        return cls(names, usable)

    def usable(self, name: str) -> bool:
        return name in self.phrases
