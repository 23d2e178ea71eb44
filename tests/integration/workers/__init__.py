"""Programs the integration tests launch on several ranks (torchrun, gloo on CPU): one module per worker, each a
`main(argv) -> dict` run through `run_worker`, which writes the dict as <RESULT_DIR>/<rank>.json for the test."""

import faulthandler
import json
import os
import sys
from typing import Callable


def run_worker(main: Callable[[list[str]], dict]) -> None:
    """Run main(sys.argv[1:]) on this rank, write its result, and end as the launchers do (pascal_dist.cli.run_rank):
    Python's finalization can abort a rank whose process group was cleanly destroyed ("terminate called without an
    active exception", seen here about 1 in 20)."""
    faulthandler.enable()  # a C++ abort prints every thread's Python stack
    result = main(sys.argv[1:])
    with open(os.path.join(os.environ["RESULT_DIR"], os.environ["RANK"] + ".json"), "w") as f:
        json.dump(result, f)
    sys.stdout.flush()
    os._exit(0)
