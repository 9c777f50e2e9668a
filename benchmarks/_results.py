"""The one place the benchmarks write their figures: a JSON file ``{"meta": ..., "rows": [...]}``."""
import json


def write_results(path, meta: dict, rows: list) -> None:
    """Write ``meta`` (the run's settings and machine) and ``rows`` (one dict per case) to ``path``."""
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
