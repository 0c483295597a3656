"""The training CLI: a --dry-run writes weights and a card that agree, and the same seed gives the same bytes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from service import classifiers, train


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_dry_run_writes_weights_and_a_matching_card(name: str, tmp_path: Path) -> None:
    train.main([name, "--dry-run", "--dry-run-batches", "3", "--out", str(tmp_path)])
    card = json.loads((tmp_path / f"mnist-{name}.json").read_text())
    weights = (tmp_path / f"mnist-{name}.safetensors").read_bytes()
    assert card["weights"]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert card["training"]["dry_run"] is True and card["training"]["seed"] == 0
    assert len(card["training"]["history"]) == 1 and 0 <= card["test_accuracy"] <= 1
    assert {"architecture", "parameters", "preprocessing", "torch_version"} <= set(card)
    loaded = classifiers.load_classifier(name, tmp_path)  # what the service would serve
    assert loaded.card["parameters"] == card["parameters"]


def test_training_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    digests = []
    for run, seed in (("a", 1), ("b", 1), ("c", 2)):
        out = tmp_path / run
        train.main(["mlp", "--dry-run", "--dry-run-batches", "3", "--seed", str(seed), "--out", str(out)])
        digests.append(hashlib.sha256((out / "mnist-mlp.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1] != digests[2]
