"""The one place the benchmarks write their figures: a JSON file ``{"meta": ..., "rows": [...]}``."""
import json
import os


def write_results(path, meta: dict, rows: list) -> None:
    """Write ``meta`` (the run's settings and machine) and ``rows`` (one dict per case) to ``path``.

    Written to a temporary file and renamed, so a run killed mid-write (a benchmark that rewrites
    the file after each solver, under a time limit) leaves the previous complete file.
    """
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    os.replace(tmp, path)
