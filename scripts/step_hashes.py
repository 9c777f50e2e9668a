"""Train a tiny run of every training option and print a hash of its final weights, heads, permutation and
optimizer state, with the last epoch's loss: run it at two commits to show that a change of the training
step trains bit for bit as before.

    PYTHONPATH=. python scripts/step_hashes.py OUT_DIR    # also writes OUT_DIR/hashes.json
"""
import hashlib
import json
import os
import sys

import torch

from nat_ext import train as nat_train
from nat_ext.checkpoint import load_checkpoint
from nat_ext.config import Config, parse_config

BASE = ["--no-resume", "--limit", "512", "--batch-size", "64", "--dim", "16", "--epochs", "2",
        "--reassign-every", "1", "--no-eval", "--seed", "1", "--log-every", "0"]
OPTIONS = {"defaults": [], "views2": ["--views", "2"], "crops": ["--crops", "2,2"],
           "rotation": ["--rotation-loss", "0.5", "--rotation-fraction", "0.5"], "koleo": ["--koleo", "0.1"],
           "supervised": ["--objective", "supervised"], "dataset": ["--reassign-scope", "dataset"],
           "sinkhorn": ["--align", "sinkhorn"], "onehot": ["--targets", "onehot", "--num-prototypes", "8"],
           "amp": ["--amp"], "all": ["--crops", "2,2", "--rotation-loss", "0.5", "--koleo", "0.1"]}


def _update(h, value) -> None:
    if torch.is_tensor(value):
        h.update(value.numpy().tobytes())
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            _update(h, value[k])
    else:
        h.update(str(value).encode())


def main(out: str) -> dict:
    hashes = {}
    for name, options in OPTIONS.items():
        folder = os.path.join(out, name)
        nat_train.train(parse_config(Config, BASE + options + ["--out", folder]))
        ck = load_checkpoint(os.path.join(folder, "checkpoint.pt"))
        h = hashlib.sha256()
        for part in ("model", "aux", "assignment"):
            if part in ck:
                _update(h, ck[part])
        _update(h, ck["optimizer"]["state"])
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            loss = [json.loads(line) for line in f][-1]["loss"]
        hashes[name] = [h.hexdigest()[:16], loss]
        print(name, hashes[name], flush=True)
    with open(os.path.join(out, "hashes.json"), "w") as f:
        json.dump(hashes, f, indent=1)
    return hashes


if __name__ == "__main__":
    main(sys.argv[1])
