"""Architecture search entry point: ``python search.py [overrides]`` (config: conf/search.yaml).

Examples:
    python search.py                                     # CPU-sized DARTS search on PTB (~8.5 min, 2 cores)
    python search.py experiment=darts_ptb_2nd            # the paper's second-order search (GPU)
    python search.py experiment=smoke strategy.unrolled=true
    python search.py resume=outputs/search/<date>/<time>  # continue an interrupted run (Ctrl-C / SIGTERM / a kill)
"""
import hydra
from omegaconf import DictConfig

import nas.config  # noqa: F401  (stores the config schemas)


@hydra.main(version_base="1.3", config_path="conf", config_name="search")
def main(cfg: DictConfig) -> None:
    from nas.cli import run_entry
    from nas.engine.search import search

    run_entry(search, cfg)


if __name__ == "__main__":
    import sys

    from nas.cli import prepare_argv

    sys.argv = prepare_argv(sys.argv, "search.py")
    main()
