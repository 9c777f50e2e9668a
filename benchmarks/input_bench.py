"""Images per second per core of the input pipeline: torchvision's (what nat-train used before
issue 17) against ours (nat_ext.presets), on a generated ImageNet-like JPEG tree, in one run.
See docs/input_pipeline.md.

    python benchmarks/input_bench.py                           # 224 and 64 px, 300 images
    python benchmarks/input_bench.py --sizes 224 --json docs/results/input_cpu.json

The tree: ``--images`` JPEGs of 500 x 375 (ImageNet's typical size), a smooth random colour field
plus correlated and per-pixel noise, quality 90: about 110 KB each, ImageNet's average, so that
decoding costs what it costs on ImageNet (written once under ``--root``, reused when present).

What is timed, per core (one torch thread, ``num_workers=0``: the loader's work in this process,
the work one worker does): iterating a DataLoader of ``--batch`` images over the whole tree, from
file to collated batch. Pipelines:

* ``torchvision``: PIL decode, RandomResizedCrop(S), RandomHorizontalFlip, ToTensor, Normalize
  (float32 batches); evaluation: Resize(S * 8 // 7), CenterCrop(S), ToTensor, Normalize.
* ``ours``: the worker side of nat_ext.presets: decode at the DCT scale the crop allows, cut the
  box, uint8 crops packed in a CropBatch. The resize, flip and normalisation then run batched on
  the training device (DeviceTransform), timed separately on the CPU in ``ours + device step on
  cpu`` (what a CPU-only run pays) and, when a GPU is present, on it.
* ``ours, full decode``: ours without the DCT scaling (how much of the gain is decoding less).

The pipelines take turns round by round; each row is its best round (the least disturbed by other
work on the machine), in wall time and in this process's CPU time (``time.process_time``: less
moved by other processes on a loaded machine). The load average is printed and written with the
results.

Also checked: the pixels. For the same crop boxes, ours (decode, crop, device resize) against
torchvision's PIL crop + resize, in 0-255 levels: mean and 99.9th percentile of |difference|.
"""

import argparse
import os
import platform
import random
import statistics
import time

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader

from nat_ext import presets
from nat_ext.data import collate, get_dataset
from _results import write_results


def write_tree(root: str, n: int, classes: int = 10, seed: int = 0) -> dict:
    """Write ``n`` ImageNet-like JPEGs (500 x 375, ~110 KB) under ``root/train/<class>/`` (and a
    copy of every tenth under ``root/val``), unless already there. Returns their size statistics."""
    train = os.path.join(root, "train")
    marker = os.path.join(root, f".done-v2-{n}-{classes}-{seed}")
    if not os.path.exists(marker):
        rng = np.random.default_rng(seed)
        for k in range(n):
            low = rng.random((12, 16, 3)) * 255
            field = np.asarray(Image.fromarray(low.astype(np.uint8)).resize((500, 375), Image.BICUBIC), np.float32)
            blobs = rng.normal(128, 36, (94, 125, 3)).clip(0, 255).astype(np.uint8)
            blobs = np.asarray(Image.fromarray(blobs).resize((500, 375), Image.BILINEAR), np.float32) - 128
            noise = rng.uniform(12, 24)  # the spread of file sizes, ~90-125 KB
            pixels = (field + blobs + rng.normal(0, noise, (375, 500, 3))).clip(0, 255).astype(np.uint8)
            for split in ("train", "val") if k % 10 == 0 else ("train",):
                d = os.path.join(root, split, f"c{k % classes:03d}")
                os.makedirs(d, exist_ok=True)
                Image.fromarray(pixels).save(os.path.join(d, f"{k:06d}.jpg"), "JPEG", quality=90)
        open(marker, "w").close()
    sizes = [os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(train) for f in fs]
    return {"images": len(sizes), "mean_kb": statistics.mean(sizes) / 1e3, "min_kb": min(sizes) / 1e3,
            "max_kb": max(sizes) / 1e3}


def pipelines(root: str, size: int, device: str) -> dict:
    """name -> (dataset, per-batch device step or None)."""
    dt = presets.DeviceTransform(size)
    gen = torch.Generator(device=device).manual_seed(0)
    out = {}
    for split, augment in (("train", True), ("test", False)):
        tag = "train" if augment else "eval"
        out[f"{tag}: torchvision"] = (get_dataset(root, split, augment=augment, image_size=size)[0], None)
        ours = get_dataset(root, split, augment=augment, image_size=size, uint8=True)[0]
        out[f"{tag}: ours"] = (ours, None)
        out[f"{tag}: ours + device step on cpu"] = (ours, lambda x: dt(x, gen if augment else None))
        full = get_dataset(root, split, augment=augment, image_size=size, uint8=True)[0]
        full.crop.draft = False
        out[f"{tag}: ours, full decode"] = (full, None)
        cpu_run = get_dataset(root, split, augment=augment, image_size=size, uint8=True, worker_resize=True)[0]
        out[f"{tag}: ours, resize in worker (cpu runs)"] = (cpu_run, lambda x: dt(x, gen if augment else None))
        if device == "cuda":
            def step(x, augment=augment):
                y = dt(x.to("cuda", non_blocking=True), gen if augment else None)
                torch.cuda.synchronize()
                return y
            out[f"{tag}: ours + device step on cuda"] = (ours, step)
    return out


def one_round(ds, step, batch: int) -> tuple[float, float]:
    """(wall, cpu) seconds per image of one pass over ``ds`` (cpu: this process's CPU time)."""
    loader = DataLoader(ds, batch_size=batch, shuffle=False, num_workers=0, collate_fn=collate)
    t0, c0 = time.perf_counter(), time.process_time()
    for x, _, _, _ in loader:
        if step is not None:
            step(x)
    return (time.perf_counter() - t0) / len(ds), (time.process_time() - c0) / len(ds)


def decode_jpeg_round(root: str, split: str, size: int, device: str, batch: int,
                      augment: bool = True) -> tuple[float, float]:
    """Seconds per image of the other design: the worker only reads the file bytes, and
    ``torchvision.io.decode_jpeg(device=device)`` decodes the batch (nvJPEG on CUDA), the crop and
    the DeviceTransform resize, flip and normalise follow on the same device."""
    from torchvision.io import decode_jpeg, read_file

    files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(root, split)) for f in fs)
    dt = presets.DeviceTransform(size)
    gen = torch.Generator(device=device).manual_seed(0)
    rng = random.Random(0)
    t0, c0 = time.perf_counter(), time.process_time()
    for a in range(0, len(files), batch):
        datas = [read_file(f) for f in files[a:a + batch]]  # the worker's whole job
        imgs = decode_jpeg(datas, device=device)
        crops = []
        for img in imgs:
            h, w = img.shape[1:]
            i, j, ch, cw = presets.rrc_box(w, h, rng) if augment else presets.center_box(w, h, size)
            crops.append(img[:, i:i + ch, j:j + cw].permute(1, 2, 0).contiguous())
        x = presets.CropBatch(torch.cat([c.reshape(-1) for c in crops]),
                              torch.tensor([c.shape[:2] for c in crops]))
        dt(x, gen if augment else None)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / len(files), (time.process_time() - c0) / len(files)


def read_round(root: str, split: str) -> tuple[float, float]:
    """(wall, cpu) seconds per image of reading the files (the CPU's whole share with GPU decoding)."""
    files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(root, split)) for f in fs)
    t0, c0 = time.perf_counter(), time.process_time()
    for f in files:
        with open(f, "rb") as fh:
            torch.frombuffer(bytearray(fh.read()), dtype=torch.uint8)
    return (time.perf_counter() - t0) / len(files), (time.process_time() - c0) / len(files)


def pixel_check(root: str, size: int, count: int = 40, seed: int = 0) -> dict:
    """|ours - torchvision| in 0-255 levels for the same RandomResizedCrop boxes (no flip)."""
    files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(root, "train")) for f in fs)[:count]
    dt = presets.DeviceTransform(size, mean=(0, 0, 0), std=(1 / 255,) * 3)  # identity normalisation: levels
    diffs = {True: [], False: []}
    rng = random.Random(seed)
    for path in files:
        with Image.open(path) as im:
            im = im.convert("RGB")
        box = presets.rrc_box(*im.size, rng)
        ref = torch.from_numpy(np.array(TF.resized_crop(im, *box, [size, size]))).permute(2, 0, 1).float()
        for draft in (True, False):
            crop = presets.load_crop(path, size, lambda w, h: box, draft=draft)
            ours = dt(presets.CropBatch.pack([crop]))[0]
            diffs[draft].append((ours - ref).abs().flatten())
    return {("dct-scaled" if d else "full decode"): {"mean": float(torch.cat(v).mean()),
                                                      "p99.9": float(torch.cat(v).quantile(0.999)) if
                                                      torch.cat(v).numel() < 16_000_000 else float("nan")}
            for d, v in diffs.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="/tmp/nat_input_bench", help="where the JPEG tree is written")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--sizes", default="224,64", help="comma list of --image-size values")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--decode-device", default="", help="also time torchvision.io.decode_jpeg on this device "
                                                        "(default: cuda when present)")
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    args = p.parse_args()
    torch.set_num_threads(1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tree = write_tree(args.root, args.images)
    print(f"tree: {tree['images']} JPEGs 500x375, {tree['mean_kb']:.1f} KB on average "
          f"({tree['min_kb']:.0f}-{tree['max_kb']:.0f})")
    load0 = os.getloadavg()[0]
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        pipes = pipelines(args.root, size, device)
        best, cpu = {}, {}  # each pipeline's best round: wall and CPU seconds per image

        def keep(name, times):
            best[name] = min(best.get(name, float("inf")), times[0])
            cpu[name] = min(cpu.get(name, float("inf")), times[1])

        decode_device = args.decode_device or ("cuda" if device == "cuda" else "")
        for _ in range(args.rounds):
            for name, (ds, step) in pipes.items():
                keep(name, one_round(ds, step, args.batch))
            if decode_device:
                for tag, split, augment in (("train", "train", True), ("eval", "val", False)):
                    keep(f"{tag}: decode_jpeg on {decode_device} (whole pipeline)",
                         decode_jpeg_round(args.root, split, size, decode_device, args.batch, augment))
                    keep(f"{tag}: file read only (cpu share of it)", read_round(args.root, split))
        print(f"\nimage size {size}: images/s per core (best of {args.rounds} rounds, "
              f"{len(pipes['train: ours'][0])} train / {len(pipes['eval: ours'][0])} eval images)")
        print(f"{'pipeline':46s} {'ms/image':>9s} {'img/s':>8s} {'x torchvision':>14s} "
              f"{'cpu ms/image':>13s} {'x (cpu time)':>13s}")
        for name, sec in best.items():
            tag = name.split(":")[0] + ": torchvision"
            ref, ref_cpu = best[tag], cpu[tag]
            row = {"image_size": size, "pipeline": name, "ms_per_image": sec * 1e3, "images_per_s": 1 / sec,
                   "speedup": ref / sec, "cpu_ms_per_image": cpu[name] * 1e3, "speedup_cpu": ref_cpu / cpu[name]}
            rows.append(row)
            print(f"{name:46s} {sec * 1e3:9.3f} {1 / sec:8.0f} {ref / sec:13.2f}x "
                  f"{cpu[name] * 1e3:13.3f} {ref_cpu / cpu[name]:12.2f}x")
        check = pixel_check(args.root, size)
        print("pixels vs torchvision, same boxes, 0-255 levels: " +
              ", ".join(f"{k}: mean {v['mean']:.2f}, p99.9 {v['p99.9']:.1f}" for k, v in check.items()))
        rows.append({"image_size": size, "pixel_check": check})
    load1 = os.getloadavg()[0]
    print(f"\nload average (1 min) at start {load0:.2f}, at end {load1:.2f}; cpus {os.cpu_count()}")
    if args.json:
        meta = {"device": device, "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                "torch": torch.__version__, "pillow": Image.__version__, "threads": 1, "batch": args.batch,
                "rounds": args.rounds, "tree": tree, "loadavg_start": load0, "loadavg_end": load1}
        write_results(args.json, meta, rows)


if __name__ == "__main__":
    main()
