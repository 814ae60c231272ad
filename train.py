"""Retraining entry point: ``python train.py arch=<genotype> [overrides]`` (config: conf/train.yaml).

``arch`` is a published genotype (darts_v1, darts_v2, enas), a genotype.json written by search.py (path from
the launch directory), or a search run directory.

Examples:
    python train.py arch=darts_v2                                # CPU-sized retrain on PTB (~11 min, 2 cores)
    python train.py arch=outputs/search/<date>/<time>/genotype.json
    python train.py experiment=darts_ptb_retrain arch=darts_v2   # the paper's setting (GPU, days)
    python train.py experiment=smoke arch=darts_v2               # under a minute
    python train.py resume=outputs/train/<date>/<time>  # continue an interrupted run (Ctrl-C / SIGTERM / a kill)
"""
import hydra
from omegaconf import DictConfig

import nas.config  # noqa: F401  (stores the config schemas)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from nas.cli import run_entry
    from nas.engine.train import train

    run_entry(train, cfg)


if __name__ == "__main__":
    import sys

    from nas.cli import prepare_argv

    sys.argv = prepare_argv(sys.argv, "train.py")
    main()
