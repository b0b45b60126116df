"""Preparing a corpus (enginekit/prepare.py, `enginekit prepare`): sources, shards, the manifest,
crash safety and bad input."""

from __future__ import annotations

import gzip
import hashlib
import json

import numpy as np
import pytest

from enginekit import corpus
from enginekit import prepare as preparation
from enginekit.cli import main as cli
from enginekit.corpus import CorpusError, TokenDataset
from enginekit.data import load_verdict

from corpus_helpers import ENC, EOT, expected_tokens, make_docs, prepare, split_tokens, write_docs

# ---------------------------------------------------------------------------------------------- preparation


def test_every_kind_of_source_gives_each_documents_tokens_then_endoftext(tmp_path):
    docs = make_docs(9)
    write_docs(tmp_path / "folder" / "sub", docs[:3])  # a folder, walked recursively
    (tmp_path / "folder" / "image.png").write_bytes(b"\x89PNG\xff\xfe")  # not a text suffix: skipped
    (tmp_path / "a.txt").write_text(docs[3])
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write(docs[4])
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs[5:7])))
    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"body": docs[7]}) + "\n\n")
    write_docs(tmp_path / "globbed", docs[8:])
    sources = [tmp_path / "folder", tmp_path / "a.txt", tmp_path / "b.txt.gz", tmp_path / "c.jsonl"]
    sources += [tmp_path / "d.jsonl.gz", str(tmp_path / "glob*" / "*.txt")]
    manifest = prepare(sources, tmp_path / "out", field="body", val_fraction=0.0, shard_tokens=50)
    tokens = split_tokens(tmp_path / "out", "train")
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == expected_tokens(docs)
    train = manifest["splits"]["train"]
    assert train["documents"] == 9 and train["tokens"] == len(tokens)
    assert [s["tokens"] for s in train["shards"][:-1]] == [50] * (len(train["shards"]) - 1)  # fixed-size shards
    for shard in train["shards"]:
        assert hashlib.sha256((tmp_path / "out" / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
    assert manifest["tokenizer"]["encoder_json_sha256"] == corpus.tokenizer_identity()["encoder_json_sha256"]


def test_a_literal_endoftext_inside_a_document_is_text_not_a_separator(tmp_path):
    (tmp_path / "a.txt").write_text("one <|endoftext|> two")
    prepare([tmp_path / "a.txt"], tmp_path / "out", val_fraction=0.0)
    tokens = split_tokens(tmp_path / "out", "train").tolist()
    assert tokens.count(EOT) == 1 and tokens[-1] == EOT


def test_long_documents_are_cut_where_the_tokens_do_not_change(tmp_path, monkeypatch):
    monkeypatch.setattr(preparation, "_PIECE_CHARS", 64)  # cut every ~64 characters
    monkeypatch.setattr(preparation, "_READ_BYTES", 50)
    text = load_verdict()[:6000] + "\n  spaced\t\n\n\nwords  \n x\n\ny \n"
    (tmp_path / "a.txt").write_text(text)
    prepare([tmp_path / "a.txt"], tmp_path / "out", val_fraction=0.0)
    assert split_tokens(tmp_path / "out", "train").tolist() == [*ENC.encode_ordinary(text), EOT]


def test_processes_give_the_same_shards_as_one(tmp_path, monkeypatch):
    monkeypatch.setattr(preparation, "_PIECE_CHARS", 500)  # many tasks in flight
    write_docs(tmp_path / "src", make_docs(30))
    one = prepare([tmp_path / "src"], tmp_path / "one", shard_tokens=300, workers=1)
    two = prepare([tmp_path / "src"], tmp_path / "two", shard_tokens=300, workers=2)
    assert one["splits"] == two["splits"]


def test_the_validation_split_is_by_documents_and_seeded(tmp_path):
    docs = make_docs(30)
    write_docs(tmp_path / "src", docs)
    a = prepare([tmp_path / "src"], tmp_path / "a", val_fraction=0.3, seed=5)
    b = prepare([tmp_path / "src"], tmp_path / "b", val_fraction=0.3, seed=5)
    c = prepare([tmp_path / "src"], tmp_path / "c", val_fraction=0.3, seed=6)
    assert a["splits"] == b["splits"] and a["splits"] != c["splits"]
    assert a["splits"]["train"]["documents"] + a["splits"]["val"]["documents"] == 30
    # each document lands whole in one split, in order: the splits are the documents, partitioned
    draws = np.random.default_rng(5).random(30) < 0.3
    for split, chosen in (("val", draws), ("train", ~draws)):
        kept = [d for d, pick in zip(docs, chosen) if pick]
        assert split_tokens(tmp_path / "a", split).tolist() == expected_tokens(kept)


def test_the_same_preparation_again_is_a_no_op_and_another_is_refused(tmp_path, capsys):
    write_docs(tmp_path / "src", make_docs(10))
    assert cli(["prepare", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--quiet", "--workers", "1"]) == 0
    said = capsys.readouterr().out
    first = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert f"train {first['splits']['train']['tokens']:,} tokens" in said and "--data " in said
    stamp = (tmp_path / "out" / "manifest.json").stat().st_mtime_ns
    assert prepare([tmp_path / "src"], tmp_path / "out") == first
    assert (tmp_path / "out" / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(CorpusError, match=r"already holds another corpus \(seed is 0 there, 9 now\)"):
        prepare([tmp_path / "src"], tmp_path / "out", seed=9)
    (tmp_path / "src" / "doc003.txt").write_text("changed")
    with pytest.raises(CorpusError, match=r"its sources differ \(.*doc003.txt: changed size\)"):
        prepare([tmp_path / "src"], tmp_path / "out")
    assert cli(["prepare", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds another corpus" in err
    assert (tmp_path / "out" / "manifest.json").stat().st_mtime_ns == stamp  # nothing touched


def test_an_out_folder_with_other_files_is_refused(tmp_path):
    write_docs(tmp_path / "src", make_docs(4))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(CorpusError, match="holds files that are not a corpus \\(notes.txt\\)"):
        prepare([tmp_path / "src"], tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["notes.txt"]


def test_an_interrupted_preparation_vouches_for_nothing_and_a_rerun_starts_over(tmp_path, monkeypatch):
    write_docs(tmp_path / "src", make_docs(20))
    clean = prepare([tmp_path / "src"], tmp_path / "clean", shard_tokens=200)
    real_write, written = preparation._ShardWriter._write, []

    def crash_after_two(self, ids):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(1)
        real_write(self, ids)

    monkeypatch.setattr(preparation._ShardWriter, "_write", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        prepare([tmp_path / "src"], tmp_path / "out", shard_tokens=200)
    monkeypatch.setattr(preparation._ShardWriter, "_write", real_write)
    assert not (tmp_path / "out" / "manifest.json").exists() and len(list((tmp_path / "out").glob("*.bin"))) == 2
    with pytest.raises(CorpusError, match="no manifest.json \\(an unfinished preparation: run enginekit prepare again"):
        TokenDataset(tmp_path / "out", "train", 16)
    (tmp_path / "out" / "train-000099.bin").write_bytes(b"stale")  # from some older attempt
    again = prepare([tmp_path / "src"], tmp_path / "out", shard_tokens=200)
    assert again["splits"] == clean["splits"]
    names = {s["file"] for split in again["splits"].values() for s in split["shards"]}
    assert {p.name for p in (tmp_path / "out").glob("*.bin")} == names  # nothing of the crashed run is left


# ---------------------------------------------------------------------------------------------- bad input


def test_a_file_that_is_not_utf8_names_the_file_and_byte_offset(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(preparation, "_READ_BYTES", 64)  # the bad byte lies in a later read block
    good = "é" * 100  # two bytes each
    (tmp_path / "bad.txt").write_bytes(good.encode() + b"ok\xffrest")
    with pytest.raises(CorpusError, match=r"bad.txt: not UTF-8 at byte offset 202 \(byte 0xff\); .*--errors replace"):
        prepare([tmp_path / "bad.txt"], tmp_path / "out", val_fraction=0.0)
    assert not (tmp_path / "out").exists()  # nothing half-written
    code = cli(["prepare", str(tmp_path / "bad.txt"), "--out", str(tmp_path / "o2"), "--quiet", "--val-fraction", "0"])
    assert code == 1 and capsys.readouterr().err.count("\n") == 1
    prepare([tmp_path / "bad.txt"], tmp_path / "out", val_fraction=0.0, errors="replace")
    assert split_tokens(tmp_path / "out", "train").tolist() == [*ENC.encode_ordinary(good + "ok\ufffdrest"), EOT]


def test_a_jsonl_line_that_is_not_utf8_or_lacks_the_field_is_named(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "bad \xc3"}\n')
    with pytest.raises(CorpusError, match=r"a.jsonl: not UTF-8 at byte offset 31 \(byte 0xc3\)"):
        prepare([tmp_path / "a.jsonl"], tmp_path / "out", val_fraction=0.0)
    (tmp_path / "b.jsonl").write_text('{"text": "fine"}\n{"content": "x", "id": 1}\n')
    with pytest.raises(CorpusError, match=r"b.jsonl:2: no field 'text' \(it has: content, id\); pass --field"):
        prepare([tmp_path / "b.jsonl"], tmp_path / "out", val_fraction=0.0)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: (d / "e.txt").write_text(""), "the corpus is empty: 1 file"),
        (lambda d: (d / "sub").mkdir() or (d / "sub" / "x.bin").write_bytes(b"\0"), "folder .* holds no text files"),
        (lambda d: None, "does not exist"),
    ],
    ids=["empty", "folder-without-text", "missing"],
)
def test_no_text_is_one_clear_error_and_writes_nothing(tmp_path, make, match):
    make(tmp_path)
    source = tmp_path / ("e.txt" if (tmp_path / "e.txt").exists() else "sub")
    with pytest.raises(CorpusError, match=match):
        prepare([source], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_one_document_cannot_give_a_validation_split(tmp_path):
    (tmp_path / "book.txt").write_text(load_verdict())
    (tmp_path / "out").mkdir()  # a folder the user made stays, empty
    with pytest.raises(CorpusError, match="the validation split is empty: none of the 1 document"):
        prepare([tmp_path / "book.txt"], tmp_path / "out", val_fraction=0.1)
    assert list((tmp_path / "out").iterdir()) == []
    (tmp_path / "empty.txt").write_text("")  # an empty document is skipped: no lone <|endoftext|>
    prepare([tmp_path / "empty.txt", tmp_path / "book.txt"], tmp_path / "out", val_fraction=0.0)
    assert split_tokens(tmp_path / "out", "train").tolist() == expected_tokens([load_verdict()])
