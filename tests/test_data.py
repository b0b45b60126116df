from __future__ import annotations

import hashlib
import shutil

import pytest
import tiktoken
import torch

from enginekit.data import create_dataloader, gpt2_tokenizer, load_verdict, verdict_loaders

SAMPLE = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
SAMPLE_IDS = [
    15496,
    11,
    466,
    345,
    588,
    8887,
    30,
    220,
    50256,
    554,
    262,
    4252,
    18250,
    8812,
    2114,
    286,
    617,
    34680,
    27271,
    13,
]


def test_sample_sentence_ids():
    assert gpt2_tokenizer().encode(SAMPLE, allowed_special={"<|endoftext|>"}) == SAMPLE_IDS


def test_whole_story_is_5145_tokens():
    text = load_verdict()
    assert len(text) == 20479
    assert (
        hashlib.sha256(text.encode()).hexdigest() == "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"
    )
    assert len(gpt2_tokenizer().encode(load_verdict())) == 5145


def test_same_ids_as_tiktokens_own_gpt2_fed_through_its_cache(tmp_path, monkeypatch):
    from tiktoken_ext import openai_public

    from enginekit import data

    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    for name in ("vocab.bpe", "encoder.json"):
        key = hashlib.sha1((base + name).encode()).hexdigest()
        shutil.copy(data.resources.files("enginekit") / "_data" / "gpt2" / name, tmp_path / key)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    # Any attempt to download would mean the cache was not used.
    monkeypatch.setattr(tiktoken.load, "read_file", lambda path: pytest.fail(f"tiktoken tried to fetch {path}"))
    theirs = tiktoken.Encoding(**openai_public.gpt2())
    ours = gpt2_tokenizer()
    text = load_verdict()[:5000] + " <|endoftext|> " + SAMPLE
    assert ours.encode(text, allowed_special="all") == theirs.encode(text, allowed_special="all")
    assert ours.n_vocab == theirs.n_vocab == 50257
    assert ours.decode(ours.encode(text, allowed_special="all")) == text


def test_tokenizer_needs_no_network_and_no_cache(monkeypatch):
    monkeypatch.setattr(tiktoken.load, "read_file_cached", lambda *a, **k: pytest.fail("cache used"))
    monkeypatch.setattr(tiktoken.load, "read_file", lambda *a, **k: pytest.fail("network used"))
    enc = gpt2_tokenizer.__wrapped__()
    assert enc.encode("Every effort moves you") == [6109, 3626, 6100, 345]


def test_appendix_d_loaders_have_9_and_1_batches():
    torch.manual_seed(123)
    train, val = verdict_loaders(batch_size=2, context_length=256)
    assert (len(train), len(val)) == (9, 1)
    assert 15 * len(train) == 135
    x, y = next(iter(train))
    assert x.shape == y.shape == (2, 256)


def test_targets_are_inputs_shifted_by_one():
    loader = create_dataloader(load_verdict()[:3000], batch_size=3, max_length=8, stride=5, shuffle=False)
    ids = gpt2_tokenizer().encode(load_verdict()[:3000])
    x, y = next(iter(loader))
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert x[1].tolist() == ids[5:13] and y[1].tolist() == ids[6:14]  # stride 5


def test_text_too_short_for_one_window_is_a_clear_error():
    with pytest.raises(ValueError, match="too short.*max_length is 256"):
        create_dataloader("Every effort moves you", batch_size=2, max_length=256, stride=256)


def test_too_few_windows_for_drop_last_is_a_clear_error():
    text = load_verdict()[:400]  # about 90 tokens: 2 windows of 32
    with pytest.raises(ValueError, match="fewer than batch_size 4"):
        create_dataloader(text, batch_size=4, max_length=32, stride=32, drop_last=True)
    assert len(create_dataloader(text, batch_size=4, max_length=32, stride=32, drop_last=False)) == 1
