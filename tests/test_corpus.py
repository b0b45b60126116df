"""Reading a prepared corpus (enginekit/corpus.py): windows across shards, bad input to loading,
the main job on it. Batching it is tests/test_token_loader.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from enginekit import corpus
from enginekit.corpus import CorpusError, TokenDataset, corpus_loaders

from conftest import ROOT
from corpus_helpers import split_tokens

# ---------------------------------------------------------------------------------------------- bad input to loading


def test_a_manifest_from_another_tokenizer_is_refused(prepared, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["tokenizer"]["encoder_json_sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorpusError, match="tokenized with another tokenizer .* prepare it again"):
        TokenDataset(copy, "train", 16)


def test_a_damaged_shard_is_found_on_load_and_checked_hashes_are_remembered(prepared, tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    (copy / ".verified.json").unlink(missing_ok=True)
    hashed = []
    real = corpus._sha256_file
    monkeypatch.setattr(corpus, "_sha256_file", lambda p: hashed.append(p.name) or real(p))
    TokenDataset(copy, "train", 16)
    n_shards = len(json.loads((copy / "manifest.json").read_text())["splits"]["train"]["shards"])
    assert len(hashed) == n_shards
    TokenDataset(copy, "train", 16)
    assert len(hashed) == n_shards  # verified once: size and mtime unchanged, no hashing again
    shard = copy / "train-000001.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF  # same size, one byte flipped: a new mtime, so it is hashed again
    shard.write_bytes(bytes(data))
    with pytest.raises(CorpusError, match="shard train-000001.bin does not match its sha256 in manifest.json"):
        TokenDataset(copy, "train", 16)
    TokenDataset(copy, "train", 16, verify="size")  # the documented opt-out checks sizes only
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(CorpusError, match="train-000001.bin has .* bytes, the manifest says"):
        TokenDataset(copy, "train", 16, verify="size")


def test_a_context_longer_than_the_validation_split_is_refused(prepared):
    val_tokens = json.loads((prepared / "manifest.json").read_text())["splits"]["val"]["tokens"]
    with pytest.raises(CorpusError, match=f"the val split has {val_tokens} tokens .* needs {val_tokens + 1}"):
        corpus_loaders(prepared, 2, context_length=val_tokens)


# ---------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("access", ["pread", "mmap"])
@pytest.mark.parametrize("stride", [16, 5, 23])
def test_windows_follow_the_books_stride_across_shard_boundaries(prepared, stride, access):
    ids = torch.from_numpy(split_tokens(prepared, "train").astype(np.int64))
    ds = TokenDataset(prepared, "train", 16, stride, access=access)
    starts = range(0, len(ids) - 16, stride)  # GPTDatasetV1's windows
    assert len(ds) == len(starts)
    for i in [0, 1, len(starts) // 2, len(starts) - 1, *range(55, 70)]:  # 997-token shards: crossings
        x, y = ds[i]
        assert torch.equal(x, ids[starts[i] : starts[i] + 16]) and torch.equal(y, ids[starts[i] + 1 : starts[i] + 17])
    x, y = ds.batch([3, 0])
    assert x.shape == (2, 16) and x.dtype == torch.int64 and torch.equal(x[1], ds[0][0])


# ---------------------------------------------------------------------------------------------- the main job


def _example():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pretrain_verdict_corpus", ROOT / "examples" / "pretrain_verdict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_main_job_trains_on_a_prepared_folder_and_evaluates_on_its_validation_split(prepared, tmp_path, capsys):
    example = _example()
    out = tmp_path / "run"
    args = ["--model", "tiny", "--data", str(prepared), "--max-steps", "5", "--eval-freq", "2", "--out", str(out)]
    assert example.main([*args, "--no-sample", "--no-progress", "--no-checkpoint"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert rows[-1]["tokens_seen"] == 5 * 2 * 64  # batch 2 x context 64 per step, steps 0..4
    # the last evaluation (after the last step) is the final weights' loss on the validation split's first batch
    from enginekit.gpt import GPTModel

    model = GPTModel(example.CONFIGS["tiny"]).eval()
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    _, val = corpus_loaders(prepared, 2, 64)
    with torch.no_grad():
        x, y = next(iter(val))
        expected = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    assert rows[-1]["val_loss"] == pytest.approx(expected, rel=1e-6)
    capsys.readouterr()
    assert example.main(["--model", "tiny", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "r2")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a prepared corpus: it has no manifest.json" in err


def test_the_main_jobs_help_says_when_to_use_max_steps_instead_of_epochs(capsys):
    with pytest.raises(SystemExit):
        _example().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--data DIR" in text and "enginekit prepare SOURCES --out DIR" in text
    assert "millions of steps per epoch, so give --max-steps there" in text


def test_the_docs_python_blocks_run():
    import re

    text = (ROOT / "docs" / "corpus.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    for block in blocks:
        exec(block, {})
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Your own text") :]
    assert "enginekit prepare my_texts/ --out corpus/" in section and "--data corpus/" in section
