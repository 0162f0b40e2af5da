"""Write PLI's other training corpora in the jsonl layout zscir reads (``conf/data/*_captions.yaml``).

    python experiments/pli_corpora.py flickr30k /data        # -> /data/pli_corpora/flickr30k.jsonl
    python experiments/pli_corpora.py mscoco /data           # -> /data/pli_corpora/mscoco.jsonl
    python experiments/pli_corpora.py imagenet_llava /data   # -> /data/pli_corpora/imagenet_llava.jsonl

Input: the official PLI layouts under the data dir (Chen-Junyang-cn/PLI ``data/pretrain_data.py``):

* ``flickr30k/flickr_annotations_30k.csv`` (columns ``raw``: the list of captions, ``filename``) and
  ``flickr30k/flickr30k_images/``. Every row is used, whatever its ``split`` column, one sample per caption
  (the official ``Flickr30kCaptionsDataset`` ignores the split).
* ``MSCOCO/annotations/captions_train2017.json`` and ``MSCOCO/train2017/<image id:012d>.jpg``, one sample
  per caption (``MSCOCOCaptionsDataset``).
* ``ImageNet1K/test/**/*.JPEG`` with ``ImageNet1K/captions/<name>.txt``, then ``llava/metadata.json``
  (``[{"image", "caption"}]``, images under ``llava/images/``): ``ImageVaDataset``.

Output lines are ``{"image": <path relative to the data dir>, "caption": <text>}``; the data configs set
``image_root`` to the data dir. Images are not opened (a missing one is skipped at training time, with a
warning naming it).
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Iterator
from pathlib import Path

CORPORA = ("flickr30k", "mscoco", "imagenet_llava")


def flickr30k(data_dir: Path) -> Iterator[tuple[str, str]]:
    """(image, caption) for every caption of every row of ``flickr_annotations_30k.csv``."""
    with open(data_dir / "flickr30k" / "flickr_annotations_30k.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            for caption in json.loads(row["raw"]):
                yield f"flickr30k/flickr30k_images/{row['filename']}", caption


def mscoco(data_dir: Path) -> Iterator[tuple[str, str]]:
    """(image, caption) for every annotation of ``captions_train2017.json``, in file order."""
    annotations = json.loads((data_dir / "MSCOCO" / "annotations" / "captions_train2017.json").read_text())
    for ann in annotations["annotations"]:
        yield f"MSCOCO/train2017/{ann['image_id']:012d}.jpg", ann["caption"]


def imagenet_llava(data_dir: Path) -> Iterator[tuple[str, str]]:
    """The ImageNet1K test images with their caption files (sorted), then every LLaVA metadata entry."""
    root = data_dir / "ImageNet1K"
    for image in sorted((root / "test").rglob("*.JPEG")):
        caption = (root / "captions" / image.name.replace("JPEG", "txt")).read_text(encoding="utf-8")
        yield str(image.relative_to(data_dir)), caption
    for entry in json.loads((data_dir / "llava" / "metadata.json").read_text()):
        yield f"llava/images/{entry['image']}", entry["caption"]


def convert(corpus: str, data_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``<data_dir>/pli_corpora/<corpus>.jsonl`` (or ``out``); returns its path.

    Raises:
        ValueError: ``corpus`` is not one of :data:`CORPORA`.
        FileNotFoundError: an annotation file of the official layout is missing.
    """
    if corpus not in CORPORA:
        raise ValueError(f"corpus must be one of {CORPORA}, got {corpus!r}")
    data_dir = Path(data_dir).expanduser()
    out = Path(out) if out else data_dir / "pli_corpora" / f"{corpus}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".jsonl.tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for image, caption in globals()[corpus](data_dir):
            f.write(json.dumps({"image": image, "caption": caption.strip()}) + "\n")
            n += 1
    tmp.replace(out)
    print(f"{out}: {n} samples")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", choices=CORPORA)
    parser.add_argument("data_dir", help="the folder holding flickr30k/, MSCOCO/, ImageNet1K/, llava/")
    parser.add_argument("--out", default=None, help="default: <data_dir>/pli_corpora/<corpus>.jsonl")
    args = parser.parse_args()
    convert(args.corpus, args.data_dir, args.out)
