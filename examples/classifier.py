"""The small classifier behind the image metrics (a Frechet distance on its features, the class histogram).

    python examples/classifier.py --data digits --out runs/digits_classifier.pt [--epochs 40]

Trains on the train split only, reports the held-out accuracy and saves it with the weights.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import data
from common import ExampleError, cli

FORMAT = "imm_kernels-examples-classifier/1"


class Classifier(nn.Module):
    """Three convolutions, one pooling, a 128-wide feature layer (the metrics' features), logits."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(512, 128), nn.ReLU())
        self.head = nn.Linear(128, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of (N, C, H, W) images in [0, 1]."""
        return self.head(self.body(images * 2 - 1))

    @torch.no_grad()
    def features_and_predictions(self, images: torch.Tensor, batch: int = 1024):
        """(N, 128) features and (N,) predicted classes, on the CPU."""
        self.eval()
        features = torch.cat([self.body(images[i:i + batch] * 2 - 1) for i in range(0, len(images), batch)])
        return features, self.head(features).argmax(1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_predictions(images)[0]


def accuracy(model: Classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((model.features_and_predictions(images)[1] == labels).double().mean())


def load_classifier(path, dataset: data.Dataset) -> Classifier:
    """The classifier saved at path; ExampleError unless it was trained on this data set."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # missing, truncated or foreign file
        raise ExampleError(f"cannot load the classifier {path}: {error}") from error
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ExampleError(f"{path} is not a classifier of examples/classifier.py")
    if saved["data"] != dataset.name or tuple(saved["sample_shape"]) != dataset.sample_shape:
        raise ExampleError(f"{path} was trained on {saved['data']}, not on {dataset.name}")
    model = Classifier(dataset.sample_shape[0], saved["num_classes"])
    model.load_state_dict(saved["state"])
    return model.eval()


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Train the classifier of the image metrics.")
    parser.add_argument("--data", required=True, help="a labelled image data set: digits, mnist, a folder")
    parser.add_argument("--out", required=True, help="output .pt file")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch < 1 or not args.lr > 0:
        parser.error("--epochs and --batch must be >= 1 and --lr > 0")
    return args


@cli
def main(argv=None):
    args = parse_args(argv)
    dataset = data.load(args.data)
    if dataset.kind != "images" or dataset.num_classes < 2:
        raise ExampleError(f"{args.data} is not a labelled image data set")
    torch.manual_seed(args.seed)
    train = data.to_data(dataset.train, dataset.shift, dataset.scale)
    heldout = data.to_data(dataset.heldout, dataset.shift, dataset.scale)
    model = Classifier(dataset.sample_shape[0], dataset.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs)
    for epoch in range(args.epochs):
        model.train()
        for index in torch.randperm(len(train)).split(args.batch):
            loss = F.cross_entropy(model(train[index]), dataset.train_labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
    held_out_accuracy = accuracy(model, heldout, dataset.heldout_labels)
    print(f"{args.data}: train accuracy {accuracy(model, train, dataset.train_labels):.4f}, "
          f"held-out accuracy {held_out_accuracy:.4f} ({len(heldout)} images)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(out.name + ".tmp")
    torch.save({"format": FORMAT, "data": dataset.name, "sample_shape": list(dataset.sample_shape),
                "num_classes": dataset.num_classes, "state": model.state_dict(), "accuracy": held_out_accuracy},
               temporary)
    os.replace(temporary, out)


if __name__ == "__main__":
    main()
