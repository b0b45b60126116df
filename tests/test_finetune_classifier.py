"""examples/finetune_classifier.py end to end on CPU: the book's GPT as a 2-class classifier."""

from __future__ import annotations

import importlib.util
import json

from conftest import ROOT


def test_fine_tunes_to_a_high_accuracy_logged_like_the_losses(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("finetune_classifier", ROOT / "examples" / "finetune_classifier.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--out", str(tmp_path), "--epochs", "3"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all({"train_loss", "val_loss", "train_accuracy", "val_accuracy", "lr"} <= set(r) for r in rows)
    assert rows[0]["val_accuracy"] < 0.8 and rows[-1]["val_accuracy"] >= 0.9  # it learned
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert list((tmp_path / "checkpoints").glob("ckpt-*/manifest.json"))
    assert "validation accuracy" in capsys.readouterr().out
