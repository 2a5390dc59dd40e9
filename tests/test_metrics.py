"""The sample-quality metrics of examples/metrics.py, which every table of the main job and docs/ prints:
closed forms and brute-force definitions, and the averaging over disjoint sets."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import data  # noqa: E402
import metrics  # noqa: E402


def random(generator, *shape):
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def test_sliced_wasserstein_of_a_shifted_set():
    """Shifting a set by c moves every projection on d by c . d, so SW = sqrt(mean_d (c . d)^2) exactly; the
    shifted copy is shuffled, so only a correct sort finds the pairs."""
    generator = torch.Generator().manual_seed(1)
    a, directions = random(generator, 300, 3), random(generator, 50, 3)
    directions /= directions.norm(dim=1, keepdim=True)
    shift = torch.tensor([0.3, -1.2, 0.7], dtype=torch.float64)
    b = a[torch.randperm(300, generator=generator)] + shift
    expected = float(((directions @ shift) ** 2).mean().sqrt())
    assert metrics.sliced_wasserstein(a, b, directions) == pytest.approx(expected, rel=1e-12)
    kept = metrics.sorted_projections(b, directions)
    assert metrics.sliced_wasserstein(a, b, directions, kept) == pytest.approx(expected, rel=1e-12)


def test_gaussian_mmd_matches_its_definition():
    generator = torch.Generator().manual_seed(2)
    a, b, median_sq = random(generator, 300, 2), random(generator, 280, 2) * 1.3 + 0.2, 0.8

    def mean_kernel(x, y):  # every pair at once, no chunks
        return float(torch.exp(-((x[:, None] - y[None]) ** 2).sum(-1) / median_sq).mean())

    expected = (mean_kernel(a, a) + mean_kernel(b, b) - 2 * mean_kernel(a, b)) ** 0.5
    assert metrics.gaussian_mmd(a, b, median_sq) == pytest.approx(expected, rel=1e-10)
    kept = metrics.mean_gaussian_kernel(b, b, median_sq, chunk=7)
    assert metrics.gaussian_mmd(a, b, median_sq, kept) == pytest.approx(expected, rel=1e-10)


def test_precision_recall_match_their_definition():
    """Kynkaenniemi et al.: a point counts when it lies in some other set's point's ball reaching to that
    point's k-th nearest neighbour in its own set."""
    generator = torch.Generator().manual_seed(3)
    samples, real, k = random(generator, 300, 2) * 1.2, random(generator, 280, 2), 3

    def covered(queries, centres):
        distances = torch.cdist(centres, centres)
        radii = distances.sort(dim=1).values[:, k]  # column 0 is the point itself
        return float((torch.cdist(queries, centres) <= radii).any(1).double().mean())

    precision, recall = metrics.precision_recall(samples, real, metrics._kth_neighbour_radius(real, k), k=k)
    assert (precision, recall) == (covered(samples, real), covered(real, samples))
    assert 0.3 < precision < 1 and 0.3 < recall < 1  # neither trivially 0 nor 1 on these sets


def test_evaluator_averages_disjoint_sets():
    """With sets = 3 each metric is the mean of the three sets' metrics, and the floor the mean over three
    disjoint training subsets (not three copies of the first)."""
    rng = np.random.default_rng(4)
    dataset = data._points("blobs", rng.normal(size=(400, 2)) * [1.0, 2.0], rng.normal(size=(60, 2)) * [1.0, 2.0])
    evaluator, single = metrics.Evaluator(dataset, n=50, sets=3), metrics.Evaluator(dataset, n=50)
    samples = rng.normal(size=(160, 2)) * [1.1, 1.8]  # 10 beyond 3 x 50: ignored
    per_set = [single.measure(samples[i:i + 50]) for i in (0, 50, 100)]
    measured = evaluator.measure(samples)
    assert [m["SW"] for m in evaluator.measure_sets(samples)] == pytest.approx([m["SW"] for m in per_set], rel=1e-12)
    for key in ("SW", "MMD", "precision", "recall"):
        assert measured[key] == pytest.approx(np.mean([m[key] for m in per_set]), rel=1e-12), key
    train = data.to_data(dataset.train.double(), dataset.shift, dataset.scale)
    floors = [metrics.sliced_wasserstein(train[i:i + 50], evaluator.heldout, evaluator.directions) for i in (0, 50, 100)]
    assert evaluator.floor["SW"] == pytest.approx(np.mean(floors), rel=1e-12)
    table = evaluator.table({"model": (samples, None)})
    assert table["sets"] == 3 and metrics.format_table(table).startswith("n = 50 x 3 sets")
    assert table["rows"]["model"]["SW / floor"] == pytest.approx(measured["SW"] / np.mean(floors), rel=1e-12)
    with pytest.raises(ValueError, match=r"need at least 150 samples \(3 set\(s\) of 50\)"):
        evaluator.measure(samples[:149])
    with pytest.raises(ValueError, match="sets must be between 1 and the 400 training points; got 0"):
        metrics.Evaluator(dataset, sets=0)
