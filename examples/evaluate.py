"""Offline evaluation of sample files against the held-out split of the checkpoint's data set.

    python examples/evaluate.py --ckpt DIR --samples s1.npy s2.npy [--classifier C.pt] [--n N] [--sets S]

Prints the metric table (see metrics.py for the metrics and the floor) and writes it to DIR/metrics.json.
Labels of class-conditional samples are read from FILE.labels.npy beside each FILE.npy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import checkpoint
import data
import metrics
from classifier import load_classifier
from common import ExampleError, cli


def load_samples(path: Path):
    try:
        samples = np.load(path, allow_pickle=False)
        labels_path = path.with_suffix(".labels.npy")
        labels = np.load(labels_path, allow_pickle=False) if labels_path.exists() else None
    except Exception as error:  # numpy raises several types for a file that is not an .npy array
        raise ExampleError(f"cannot read samples from {path}: {error}") from error
    return samples, labels


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description="Score sample files of sample.py against held-out data.")
    parser.add_argument("--ckpt", required=True, help="the train.py output folder the samples came from")
    parser.add_argument("--samples", nargs="+", required=True, help="FILE.npy written by sample.py")
    parser.add_argument("--classifier", help="classifier.pt of examples/classifier.py (image data)")
    parser.add_argument("--n", type=int, help="samples per set (default: the held-out split's size)")
    parser.add_argument("--sets", type=int, default=1,
                        help="score each file as the mean over this many disjoint sets of n samples, and the "
                             "floor over as many sets of n training points (default: 1)")
    args = parser.parse_args(argv)
    if args.sets < 1:
        parser.error(f"--sets must be >= 1; got {args.sets}")
    state = checkpoint.load(args.ckpt)
    dataset = data.load(state["config"]["data"], image_size=state["config"]["image_size"])
    classifier = load_classifier(args.classifier, dataset) if args.classifier else None
    if dataset.kind == "images" and classifier is None:
        raise ExampleError("image metrics need --classifier (train one with examples/classifier.py)")
    sample_sets = {Path(p).stem: load_samples(Path(p)) for p in args.samples}
    try:
        table = metrics.Evaluator(dataset, n=args.n, sets=args.sets, classifier=classifier).table(sample_sets)
    except ValueError as error:
        raise ExampleError(str(error)) from error
    report = {"step": state["step"], "data": state["config"]["data"], **table}
    out = checkpoint.load_path(args.ckpt).parent / "metrics.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(metrics.format_table(table))
    print(f"(written to {out})")


if __name__ == "__main__":
    main()
