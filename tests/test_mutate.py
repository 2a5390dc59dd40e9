"""tests/mutate.py stays usable: every planted bug still applies to the current source."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import mutate  # noqa: E402


@pytest.mark.parametrize("number,mutant", list(enumerate(mutate.MUTANTS + mutate.CUDA_MUTANTS)),
                         ids=lambda value: str(value) if isinstance(value, int) else "")
def test_every_mutant_applies(number, mutant):
    """A mutant whose text the code no longer has would run the unchanged code and pass as 'caught' or fail the
    whole run: its old text must occur exactly once in its file."""
    assert (ROOT / mutant.path).read_text().count(mutant.old) == 1, f"mutant {number} ({mutant.what}) is stale"
