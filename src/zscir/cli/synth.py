"""``zscir-synth``: generate the synthetic shapes world (deterministic from its seed).

zscir-synth                         # the default world in data/synthetic
zscir-synth synth.corpus_train=2000 paths.synthetic_dir=/tmp/small force=true
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from zscir.cli.config import CONF_DIR, parse_config, plain
from zscir.data.synthetic import SynthConfig, generate_world


def synth(cfg: DictConfig) -> Path:
    root = generate_world(
        cfg.paths.synthetic_dir, parse_config(SynthConfig, plain(cfg.synth)), force=bool(cfg.get("force"))
    )
    print(f"synthetic world ready in {root}", flush=True)
    return root


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="synth")
def main(cfg: DictConfig) -> None:
    synth(cfg)


if __name__ == "__main__":
    main()
