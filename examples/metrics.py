"""Offline sample quality against the held-out split, always beside the floor: the same metric between
n training samples and the n held-out ones (what a perfect generator would score with n samples).
With sets = S > 1 every metric, the floor's included, is the mean over S disjoint sets of n (samples, or
training points for the floor) against the same n held-out points: one set of n leaves a score noisy.

Points (in the data's own units):
  SW     sliced 2-Wasserstein distance: sqrt of the mean over 1,000 random unit directions (fixed seed, the
         same for every row) of the squared 1-D 2-Wasserstein distance of the projections; with equally
         many points that is the mean squared difference of the sorted projections (the quantity POT's
         sliced_wasserstein_distance estimates with p = 2).
  MMD    sqrt of the biased (V-statistic) MMD^2 with the Gaussian kernel exp(-|x - y|^2 / h), h the median
         squared distance between held-out points.
  precision / recall   the k-nearest-neighbour manifold estimates of Kynkaenniemi et al. (2019) with k = 5,
         as in the prdc package: the share of samples inside some held-out point's 5-NN ball, and of
         held-out points inside some sample's 5-NN ball.
Images (in [0, 1]):
  FD     Frechet distance between Gaussians fitted to the penultimate features of a small classifier
         trained on the same data set (examples/classifier.py), a data-set-specific stand-in for FID.
  label acc   the share of samples the classifier assigns to the class they were generated for.
  classes     the histogram of the classifier's predicted classes over the samples.
"""

from __future__ import annotations

import numpy as np
import torch

from data import Dataset, to_data

PROJECTIONS = 1000
NEIGHBOURS = 5
FLOOR = "real (train vs held-out)"
CHUNK = 256  # rows per pairwise-distance block: 10 MB blocks are reused, larger ones are re-mapped from the OS


def sorted_projections(x: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """(L, n): the projections of the (n, D) points on each of the (L, D) directions, each row sorted (by
    numpy: several times faster than torch.sort on CPU, and a sort is exact either way)."""
    return torch.from_numpy(np.sort((directions @ x.T).numpy(), axis=1))


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor,
                       b_projections: torch.Tensor | None = None) -> float:
    """SW_2 of two equally large point sets (n, D) over the (L, D) unit directions; b_projections:
    sorted_projections(b, directions) when the caller keeps them."""
    if b_projections is None:
        b_projections = sorted_projections(b, directions)
    return float(((sorted_projections(a, directions) - b_projections) ** 2).mean().sqrt())


def mean_gaussian_kernel(x: torch.Tensor, y: torch.Tensor, median_sq: float, chunk: int = CHUNK) -> float:
    """Mean of exp(-|x_i - y_j|^2 / median_sq) over all pairs, in row chunks (O(chunk n) memory)."""
    total = sum(float(torch.exp(-torch.cdist(x[i:i + chunk], y) ** 2 / median_sq).sum())
                for i in range(0, len(x), chunk))
    return total / (len(x) * len(y))


def gaussian_mmd(a: torch.Tensor, b: torch.Tensor, median_sq: float, b_self: float | None = None) -> float:
    """sqrt of the V-statistic MMD^2 with exp(-|x - y|^2 / median_sq); b_self: mean_gaussian_kernel(b, b)
    when the caller keeps it."""
    if b_self is None:
        b_self = mean_gaussian_kernel(b, b, median_sq)
    mmd_sq = mean_gaussian_kernel(a, a, median_sq) + b_self - 2 * mean_gaussian_kernel(a, b, median_sq)
    return max(mmd_sq, 0.0) ** 0.5


def _kth_neighbour_radius(x: torch.Tensor, k: int, chunk: int = CHUNK) -> torch.Tensor:
    """Distance of every row of x to its k-th nearest other row."""
    return torch.cat([torch.cdist(x[i:i + chunk], x).topk(k + 1, largest=False).values[:, -1]
                      for i in range(0, len(x), chunk)])


def _inside_any_ball(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = CHUNK) -> float:
    inside = [(torch.cdist(queries[i:i + chunk], centres) <= radii).any(1) for i in range(0, len(queries), chunk)]
    return float(torch.cat(inside).double().mean())


def precision_recall(samples: torch.Tensor, real: torch.Tensor, real_radii: torch.Tensor, k: int = NEIGHBOURS):
    precision = _inside_any_ball(samples, real, real_radii)
    recall = _inside_any_ball(real, samples, _kth_neighbour_radius(samples, k))
    return precision, recall


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of the (n, F) feature sets, in float64; the trace
    of the matrix root is that of the symmetric S_a^(1/2) S_b S_a^(1/2)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(cross).sum())


class Evaluator:
    """Scores sample sets (in data units, as sample.py writes them) against the held-out split.

    n: how many held-out points (and samples per set) enter each metric.
    sets: every metric is the mean over this many disjoint sets of n samples (the first sets x n samples;
        the rest are ignored), and the floor the mean over as many disjoint sets of n training points.
    classifier: for images, a classifier.Classifier (no image metric without one).
    """

    def __init__(self, dataset: Dataset, *, n: int | None = None, sets: int = 1, classifier=None, seed: int = 0):
        if sets < 1 or len(dataset.train) < sets:
            raise ValueError(f"sets must be between 1 and the {len(dataset.train)} training points; got {sets}")
        self.kind, self.sets = dataset.kind, sets
        self.n = min(n or len(dataset.heldout), len(dataset.heldout), len(dataset.train) // sets)
        self.heldout = to_data(dataset.heldout[:self.n].double(), dataset.shift, dataset.scale)
        reference = to_data(dataset.train[:self.samples_needed].double(), dataset.shift, dataset.scale)
        reference_labels = None if dataset.train_labels is None else dataset.train_labels[:self.samples_needed]
        if self.kind == "points":
            generator = torch.Generator().manual_seed(seed)
            directions = torch.randn(PROJECTIONS, self.heldout.shape[1], generator=generator, dtype=torch.float64)
            self.directions = directions / directions.norm(dim=1, keepdim=True)
            self.heldout_projections = sorted_projections(self.heldout, self.directions)
            pairs = torch.cdist(self.heldout[:1000], self.heldout[:1000]) ** 2
            self.median_sq = float(pairs[pairs > 0].median())
            self.heldout_self_kernel = mean_gaussian_kernel(self.heldout, self.heldout, self.median_sq)
            self.heldout_radii = _kth_neighbour_radius(self.heldout, NEIGHBOURS)
        self.classifier = classifier
        if classifier is not None:
            self.heldout_features = classifier.features(self.heldout.float()).double().numpy()
        self.floor = self.measure(reference, reference_labels)

    @property
    def samples_needed(self) -> int:
        """How many samples measure() scores: sets x n."""
        return self.sets * self.n

    def measure(self, samples, labels=None) -> dict:
        """The metrics of sets x n samples (or more; labels: the classes they were generated for), each the
        mean over the sets; "classes" is the histogram over all of them."""
        per_set = self.measure_sets(samples, labels)
        return {key: (np.sum([m[key] for m in per_set], axis=0).tolist() if key == "classes"
                      else float(np.mean([m[key] for m in per_set])))
                for key in per_set[0]}

    def measure_sets(self, samples, labels=None) -> list[dict]:
        """The metrics of each of the sets (the first sets x n samples, n at a time)."""
        samples = torch.as_tensor(samples, dtype=torch.float64)
        if samples.shape[1:] != self.heldout.shape[1:] or len(samples) < self.samples_needed:
            raise ValueError(f"need at least {self.samples_needed} samples ({self.sets} set(s) of {self.n}) of "
                             f"shape {tuple(self.heldout.shape[1:])}; got {tuple(samples.shape)}")
        return [self._measure_set(samples[i:i + self.n], None if labels is None else labels[i:i + self.n])
                for i in range(0, self.samples_needed, self.n)]

    def _measure_set(self, samples: torch.Tensor, labels) -> dict:
        if self.kind == "points":
            precision, recall = precision_recall(samples, self.heldout, self.heldout_radii)
            return {"SW": sliced_wasserstein(samples, self.heldout, self.directions, self.heldout_projections),
                    "MMD": gaussian_mmd(samples, self.heldout, self.median_sq, self.heldout_self_kernel),
                    "precision": precision, "recall": recall}
        if self.classifier is None:
            return {}
        features, predicted = self.classifier.features_and_predictions(samples.float())
        result = {"FD": frechet_distance(features.double().numpy(), self.heldout_features),
                  "classes": np.bincount(predicted.numpy(), minlength=self.classifier.num_classes).tolist()}
        if labels is not None:
            result["label acc"] = float((predicted == torch.as_tensor(labels)).double().mean())
        return result

    def table(self, sample_sets: dict) -> dict:
        """{"n": n, "sets": sets, "rows": {name: metrics}} with the floor first and ratios to it;
        sample_sets maps a name to (samples, labels or None)."""
        rows = {FLOOR: self.floor}
        for name, (samples, labels) in sample_sets.items():
            metrics = self.measure(samples, labels)
            for key in ("SW", "MMD", "FD"):
                if key in metrics and self.floor.get(key):
                    metrics[f"{key} / floor"] = metrics[key] / self.floor[key]
            rows[name] = metrics
        return {"n": self.n, "sets": self.sets, "rows": rows}


def format_table(table: dict) -> str:
    """The metric table as aligned text (class histograms on their own lines)."""
    rows = table["rows"]
    columns = [c for c in ("SW", "SW / floor", "MMD", "MMD / floor", "FD", "FD / floor", "label acc", "precision",
                           "recall") if any(c in r for r in rows.values())]
    width = max(len(name) for name in rows) + 2
    size = f"n = {table['n']}" + (f" x {table['sets']} sets" if table.get("sets", 1) > 1 else "")
    lines = [f"{size:<{width}}" + "".join(f"{c:>13}" for c in columns)]
    for name, metrics in rows.items():
        cells = "".join(f"{metrics[c]:>13.4g}" if c in metrics else f"{'':>13}" for c in columns)
        lines.append(f"{name:<{width}}" + cells)
    lines += [f"classes of {name}: {metrics['classes']}" for name, metrics in rows.items() if "classes" in metrics]
    return "\n".join(lines)
