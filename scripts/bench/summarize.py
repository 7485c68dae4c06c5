"""Summarises one results folder of scripts/bench-vs-diffusers.sh: medians per stage for sd-run
and diffusers, their ratio, peak RSS, how far apart the two images are, and `ratio X.XX`.
Usage: summarize.py RESULTS_DIR RES STEPS THREADS
"""

import glob
import json
import os
import statistics
import sys

import numpy as np

STAGES = [("load", "model load"), ("text", "text encode"), ("unet_step", "UNet / step"), ("decode", "VAE decode"), ("image", "whole image")]


def rows(out, name):
    with open(os.path.join(out, name + ".jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def rss_mib(out, name):
    vals = [int(open(p).read().split()[-1]) for p in glob.glob(os.path.join(out, name + ".rss.*"))]
    return max(vals) / 1024 if vals else float("nan")


def main():
    out, res, steps, threads = sys.argv[1:5]
    s, d = rows(out, "sdrun"), rows(out, "diffusers")
    print(f"sd-run vs diffusers: {res}x{res}, {steps} steps, {threads} threads, medians of {len(s)} runs (s)")
    print(f"{'stage':<14}{'sd-run':>10}{'diffusers':>11}{'ratio':>8}")
    for key, label in STAGES:
        a = statistics.median(r[key] for r in s)
        b = statistics.median(r[key] for r in d)
        print(f"{label:<14}{a:>10.3f}{b:>11.3f}{a / b:>8.2f}")
    a = statistics.median(r["load"] + r["image"] for r in s)
    b = statistics.median(r["load"] + r["image"] for r in d)
    print(f"{'load + image':<14}{a:>10.3f}{b:>11.3f}{a / b:>8.2f}")
    print(f"{'peak RSS MiB':<14}{rss_mib(out, 'sdrun'):>10.0f}{rss_mib(out, 'diffusers'):>11.0f}")
    x = np.fromfile(os.path.join(out, "sdrun.f32"), dtype=np.float32)
    y = np.fromfile(os.path.join(out, "diffusers.f32"), dtype=np.float32)
    if x.shape == y.shape:
        print(f"image max |sd-run - diffusers|: {np.abs(x - y).max():.2e}")
    ratio = statistics.median(r["image"] for r in s) / statistics.median(r["image"] for r in d)
    print(f"ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
