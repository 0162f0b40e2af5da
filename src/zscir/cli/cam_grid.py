"""``zscir-cam-grid`` (``python -m zscir.cli.cam_grid``): see what CAM-TI masks, for N training samples, as a PNG grid.

Each row: the training image, the Grad-CAM heat map of the chosen noun, the masked image φ receives, and
the caption with that noun highlighted. Takes the same overrides as ``zscir-train``:

    zscir-cam-grid -n 12 --out outputs/cam_grid.png experiment=demo method=cam_ti
    zscir-cam-grid -n 8 method=cam_ti method.mask_region=object method.tau=0.4 data=cc3m ...

An existing ``--out`` file is not replaced without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import lightning as L

from zscir.cli.config import compose_config, parse_config, plain
from zscir.cli.provision import ensure_backbone, ensure_synthetic_world
from zscir.cli.train import train
from zscir.data.loaders import DataConfig, build_train_loader
from zscir.methods import build_method

log = logging.getLogger("zscir")


def write_grid(
    overrides: list[str], n: int, out: str | Path, shuffle: bool = True, overwrite: bool = False
) -> Path:
    """Compose the training config, take the first ``n`` training samples, write the grid to ``out``.

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is not set (checked before any work).
    """
    if Path(out).exists() and not overwrite:
        raise FileExistsError(
            f"{out} exists; zscir-cam-grid does not replace it: choose another --out, or pass --overwrite"
        )
    cfg = compose_config("train", list(overrides))
    if cfg.method.kind != "cam_ti":
        raise ValueError(
            f"the CAM grid shows CAM-TI's masking; got method={cfg.method.kind} (add method=cam_ti)"
        )
    ensure_synthetic_world(cfg)
    ensure_backbone(cfg, train)
    L.seed_everything(cfg.seed, workers=True)
    method = build_method(plain(cfg.backbone), plain(cfg.method))
    data = dataclasses.replace(
        parse_config(DataConfig, plain(cfg.data)),
        batch_size=n,
        drop_last=False,
        num_workers=0,
        shuffle=shuffle,
    )
    batch = next(iter(build_train_loader(data, method.encoder.image_transform, seed=cfg.seed)))
    return method.write_cam_grid(batch, out, n)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(name)s][%(levelname)s] - %(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=8, help="number of training samples (rows)")
    parser.add_argument("--out", default="outputs/cam_grid.png", help="PNG file to write")
    parser.add_argument(
        "--no-shuffle", action="store_true", help="the corpus' first samples instead of a random draw"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for zscir-train")
    args = parser.parse_args(argv)
    try:
        path = write_grid(args.overrides, args.n, args.out, not args.no_shuffle, args.overwrite)
    except FileExistsError as err:
        print(f"zscir-cam-grid: error: {err}", file=sys.stderr)
        return 2
    print(f"CAM grid of {args.n} samples: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
