"""LoongServe's evaluation (Fig. 10, 12, 13) in the simulator, with the paper's metrics and its
numbers beside ours: see `esp.cli.bench.paper`.

    .venv/bin/python benchmarks/paper.py fig10|fig12|fig13|all [--quick] [--json OUT.json.gz] \
        [--results-md docs/results.md]
"""
from __future__ import annotations

import sys

from esp.cli.bench.paper import main

if __name__ == "__main__":
    sys.exit(main())
