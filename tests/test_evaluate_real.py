"""The real held-out sets of `rbcbatch evaluate --real`: fixed, disjoint, and what they say."""

from __future__ import annotations

from pathlib import Path

from rbcbatch.dev.evaluate_real import PBC_CLASSES, anerbc_rows, pbc_rows, pbc_split
from tests.conftest import shared_dataset


def test_the_pbc_split_is_fixed_disjoint_and_a_fifth_of_every_class():
    root = shared_dataset("pbc_subset")
    split = pbc_split(root)
    held, train = split["held_back"], split["train"]
    assert len(held) == 240 and len(train) == 960 and not set(held) & set(train)
    assert {p.parent.name for p in held} == set(PBC_CLASSES)
    assert all(sum(p.parent.name == c for p in held) == 30 for c in PBC_CLASSES)
    assert pbc_split(root) == split  # the same files every time
    first = sorted((root / "neutrophil").glob("*.jpg"))[0]
    assert first in held
    rows = pbc_rows(root)
    assert {r["um_per_px"] for r in rows} == {""}  # left to the site/scanner estimate
    assert len({r["slide_id"] for r in rows}) == 240


def test_anerbc_rows_are_the_held_out_individuals_only():
    root = shared_dataset("anerbc_sample")
    rows = anerbc_rows(root)
    assert sorted(r["slide_id"] for r in rows) == sorted(
        f"anerbc_{n}_{s}" for n in ("004", "005", "006") for s in ("a", "h")
    )
    assert all(Path(r["uri"]).is_file() for r in rows)
    assert {r["label"] for r in rows if r["slide_id"].endswith("_h")} == {"normal"}
