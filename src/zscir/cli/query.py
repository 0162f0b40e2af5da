"""``zscir-query``: composed retrieval over your own images: (reference image, modification text) pairs
against a folder of gallery images, with a trained run or a zero-shot baseline.

    zscir-query --query shoe.jpg "is red with a lower heel" --gallery shop/ --run outputs/train/lincir/<stamp>
    zscir-query --query a.jpg "as a drawing" --query b.jpg "at night" --gallery photos/ \\
                --method sum --backbone clip_vit_l14 -k 10
    zscir-query --queries queries.jsonl --gallery-list gallery.txt --run <run dir> --template "a photo of $ that {caption}"

Writes ``results.json`` and ``results.csv`` (the top k per query, best first, with cosine scores) and one
PNG grid per query (``grids/``: the reference, then the results) into ``--out`` (default
``<output dir>/query/<stamp>``). Gallery features are cached under ``--cache-dir`` (default
``<output dir>/cache/gallery``) and reused while every gallery file is unchanged; an added, removed or
replaced image re-encodes the gallery.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf

from zscir.api import (
    compose_queries,
    encode_gallery,
    load_method,
    load_run,
    output_dir,
    retrieve,
)
from zscir.backbones import BackboneLoadError
from zscir.benchmarks.base import Benchmark, ImageRef, Query
from zscir.cli.launch import run_stamp
from zscir.evaluation.visualize import Retrieved, write_grids
from zscir.methods import RetrievalMethod
from zscir.utils.images import DatasetLayoutError, ImageLoadError, list_images
from zscir.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger("zscir")


class QuerySet(Benchmark):
    """The queries and gallery of one ``zscir-query`` call, as the retrieval grids read them (unlabelled)."""

    kind = "query"

    def __init__(self, queries: list[tuple[Path, str]], gallery: list[ImageRef]):
        super().__init__(".", "query", name="query")
        self.gallery = gallery
        self.queries = [Query(ref.stem, ImageRef(str(ref), ref), (text,)) for ref, text in queries]

    def score(self, query_feats: object, gallery_feats: object) -> dict[str, float]:
        raise ValueError("zscir-query's queries have no ground truth")


def read_queries(pairs: list[list[str]], queries_file: str | None) -> list[tuple[Path, str]]:
    """(reference image, text) pairs from ``--query IMAGE TEXT`` and a JSONL file of
    ``{"reference": ..., "caption": ...}`` lines (paths relative to the file's folder).

    Raises:
        ValueError: no query, or a malformed line (named by its number).
    """
    out = [(Path(image).expanduser(), text) for image, text in pairs]
    if queries_file:
        path = Path(queries_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--queries {path} does not exist")
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict) or not isinstance(record.get("reference"), str):
                raise ValueError(f'{path}:{number}: expected {{"reference": <image>, "caption": <text>}}')
            text = record.get("caption", record.get("text"))
            if not isinstance(text, str):
                raise ValueError(f"{path}:{number}: the modification text (caption) must be a string")
            out.append((path.parent / record["reference"], text))
    if not out:
        raise ValueError("no query: pass --query IMAGE TEXT (repeatable) or --queries FILE.jsonl")
    return out


def read_gallery(folder: str | None, listing: str | None) -> list[ImageRef]:
    """The gallery images: every image under ``folder`` (ids relative to it), or the files named in
    ``listing``, one per line (relative to the list's folder).

    Raises:
        DatasetLayoutError: a missing or empty folder, a list naming missing files (with line numbers).
    """
    if folder:
        root = Path(folder).expanduser()
        return [ImageRef(p.relative_to(root).as_posix(), p) for p in list_images(root)]
    path = Path(listing).expanduser()
    if not path.is_file():
        raise DatasetLayoutError(f"--gallery-list {path} does not exist")
    refs, missing = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        file = path.parent / Path(entry).expanduser()
        if not file.is_file():
            missing.append(f"{path}:{number}: no file {file}")
        refs.append(ImageRef(entry, file))
    if missing:
        raise DatasetLayoutError(f"{len(missing)} missing gallery image(s):\n  " + "\n  ".join(missing[:20]))
    if not refs:
        raise DatasetLayoutError(f"--gallery-list {path} names no image")
    return refs


def parse_options(items: list[str]) -> dict[str, object]:
    """``key=value`` method options, values read as YAML (``0.75`` a float, ``true`` a bool, dotted keys
    nest: ``optim.lr=1e-4``)."""
    bad = [item for item in items if "=" not in item or item.startswith("=")]
    if bad:
        raise ValueError(f"--option takes key=value, got {bad[0]!r}")
    return OmegaConf.to_container(OmegaConf.from_dotlist(items))


def query(args: argparse.Namespace) -> Path:
    """Run one ``zscir-query`` call (see the module docstring); returns the output folder."""
    options = parse_options(args.option)
    if args.template is not None:
        options["template"] = args.template
    if args.run:
        method: RetrievalMethod = load_run(args.run, device=args.device, **options)
        source = {"run": str(Path(args.run).resolve())}
    elif args.method and args.backbone:
        method = load_method(args.method, args.backbone, args.checkpoint, args.device, **options)
        source = {"method": args.method, "backbone": args.backbone, "checkpoint": args.checkpoint}
    else:
        raise ValueError("say what retrieves: --run <zscir-train run dir>, or --method KIND --backbone NAME")
    pairs = read_queries(args.query, args.queries)
    gallery = read_gallery(args.gallery, args.gallery_list)
    out = Path(args.out).expanduser() if args.out else output_dir() / "query" / run_stamp()
    # queries first: a bad reference image fails before the (long) gallery encoding
    query_feats = compose_queries(
        method, [ref for ref, _ in pairs], [text for _, text in pairs], args.batch_size
    )
    cache = None if args.no_cache else Path(args.cache_dir or output_dir() / "cache" / "gallery")
    gallery_feats = encode_gallery(
        method, [r.path for r in gallery], args.batch_size, args.num_workers, cache_dir=cache, progress=True
    )
    k = min(args.k, len(gallery))
    indices, scores = retrieve(query_feats, gallery_feats, k)
    rows, records = [], []
    for (ref, text), idx, sc in zip(pairs, indices.tolist(), scores.tolist()):
        results = [
            {"rank": r, "image": gallery[i].image_id, "path": str(gallery[i].path), "score": round(s, 6)}
            for r, (i, s) in enumerate(zip(idx, sc), 1)
        ]
        records.append({"reference": str(ref), "text": text, "results": results})
        rows += [[str(ref), text, x["rank"], x["image"], x["score"]] for x in results]
    summary = {**source, "gallery": args.gallery or args.gallery_list, "gallery_size": len(gallery), "k": k}
    atomic_write_json(out / "results.json", {**summary, "queries": records})
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["reference", "text", "rank", "image", "score"])
    writer.writerows(rows)
    atomic_write_text(out / "results.csv", table.getvalue())
    if not args.no_grid:
        benchmark = QuerySet(pairs, gallery)
        items = [
            Retrieved(i, q, tuple(idx), tuple(sc), None)
            for i, (q, idx, sc) in enumerate(zip(benchmark.queries, indices.tolist(), scores.tolist()))
        ]
        write_grids(benchmark, items, out / "grids", k)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zscir-query", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    q = parser.add_argument_group("queries")
    q.add_argument(
        "--query", nargs=2, action="append", default=[], metavar=("IMAGE", "TEXT"), help="repeatable"
    )
    q.add_argument("--queries", help='JSONL file: {"reference": <image>, "caption": <text>} per line')
    g = parser.add_mutually_exclusive_group(required=True)
    g.add_argument("--gallery", help="folder of gallery images (searched recursively)")
    g.add_argument("--gallery-list", help="file naming the gallery images, one per line")
    m = parser.add_argument_group("what retrieves: --run, or --method with --backbone")
    m.add_argument("--run", help="a zscir-train run directory (its method, backbone and checkpoint)")
    m.add_argument("--method", help="a method kind, e.g. sum, image_only, text_only (zero-shot)")
    m.add_argument("--backbone", help="a backbone config name, e.g. clip_vit_l14")
    m.add_argument("--checkpoint", help="weights of --method on --backbone (a zscir checkpoint)")
    m.add_argument("--template", help="prompt template; LinCIR/CAM-TI need '$' and '{caption}' in it")
    m.add_argument(
        "-o",
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method option (repeatable)",
    )
    parser.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    parser.add_argument("--out", help="output folder (default <output dir>/query/<stamp>)")
    parser.add_argument("--cache-dir", help="gallery feature cache (default <output dir>/cache/gallery)")
    parser.add_argument("--no-cache", action="store_true", help="always encode the gallery")
    parser.add_argument("--no-grid", action="store_true", help="skip the PNG grids")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0, help="image loading processes")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: CUDA when available)")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(name)s][%(levelname)s] - %(message)s")
    args = build_parser().parse_args(argv)
    try:
        out = query(args)
    except (ValueError, KeyError, OSError, BackboneLoadError) as err:
        # bad images (ImageLoadError), folders (DatasetLayoutError), templates, options, runs
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        if isinstance(err, ImageLoadError):
            message = f"{message} (replace or remove it, or name the images to use with --gallery-list)"
        print(f"zscir-query: error: {message}", file=sys.stderr)
        return 2
    print(f"results: {out / 'results.json'}  {out / 'results.csv'}  {out / 'grids'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
