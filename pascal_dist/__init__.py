"""pascal-dist: distributed training of the Pascal-biased decoder with DeepSpeed ZeRO.

The package is layered, each layer importing only those before it: attention, config, model, data, train, eval,
and the command line (`pascal-dist --help`, pascal_dist.cli). The entry points a library user needs:
pascal_dist.config.load_config, pascal_dist.model.PascalGPT, pascal_dist.attention.register_backend,
pascal_dist.train.trainer.Trainer. This module stays import-light: it loads neither torch nor DeepSpeed.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pascal-dist")
except PackageNotFoundError:  # a checkout on sys.path that was never pip-installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
