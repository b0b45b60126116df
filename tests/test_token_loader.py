"""Batching a prepared corpus (enginekit/token_loader.py): the shuffle, ranks, workers, the O(1)
resume position, and the engine saving and restoring it."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from enginekit.corpus import CorpusError, TokenDataset
from enginekit.data import load_verdict
from enginekit.token_loader import IndexPermutation, TokenLoader, corpus_loaders

from conftest import ROOT, TINY_CFG
from corpus_helpers import make_docs, prepare, write_docs


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 1025])
def test_the_permutation_is_a_seeded_bijection(n):
    perm = [IndexPermutation(n, seed=3)(i) for i in range(n)]
    assert sorted(perm) == list(range(n))
    assert perm == [IndexPermutation(n, seed=3)(i) for i in range(n)]
    if n >= 64:
        assert perm != [IndexPermutation(n, seed=4)(i) for i in range(n)]
        assert perm != [IndexPermutation(n, seed=3, epoch=1)(i) for i in range(n)]
        assert perm != list(range(n))


def windows_seen(loader: TokenLoader, epoch: int) -> list[int]:
    return [w for b in range(len(loader)) for w in loader.windows_of_batch(epoch, b)]


def test_an_epoch_visits_every_window_once_in_a_seeded_order_that_changes_per_epoch(prepared):
    ds = TokenDataset(prepared, "train", 16)
    loader = TokenLoader(ds, 3, seed=11, drop_last=False)
    first = windows_seen(loader, 0)
    assert sorted(first) == list(range(len(ds)))
    assert first == windows_seen(TokenLoader(ds, 3, seed=11, drop_last=False), 0)
    assert first != windows_seen(loader, 1) and sorted(windows_seen(loader, 1)) == sorted(first)
    batches = list(loader)  # iterating delivers exactly those windows
    assert torch.equal(torch.cat([x for x, _ in batches]), ds.batch(first)[0])
    assert loader.state_dict()["epoch"] == 1  # an exhausted epoch moves on
    assert torch.equal(next(iter(loader))[0], ds.batch(windows_seen(loader, 1)[:3])[0])


def test_the_validation_loader_starts_from_its_first_batch_every_time(prepared):
    _, val = corpus_loaders(prepared, 2, 16)
    first = next(iter(val))[0]
    assert torch.equal(next(iter(val))[0], first) and torch.equal(next(iter(val))[0], first)


def test_two_workers_deliver_the_same_batches_in_the_same_order_as_none(prepared):
    ds = TokenDataset(prepared, "train", 16)
    plain = [x for x, _ in TokenLoader(ds, 2, seed=4)]
    workers = TokenLoader(ds, 2, seed=4, num_workers=2)
    parallel = [x for x, _ in workers]
    assert len(parallel) == len(plain) and all(torch.equal(a, b) for a, b in zip(plain, parallel))
    # the position counts batches handed over, not the ones the workers fetched ahead
    it = iter(workers)
    for _ in range(5):
        next(it)
    assert workers.state_dict()["position"] == 5
    del it


def test_ranks_get_disjoint_shards_that_cover_the_data(prepared):
    ds = TokenDataset(prepared, "train", 16)
    world = 3
    loaders = [TokenLoader(ds, 2, seed=9, rank=r, world_size=world, drop_last=False) for r in range(world)]
    seen = [windows_seen(loader, 0) for loader in loaders]
    assert len({len(s) for s in seen}) == 1  # equal steps on every rank
    flat = [w for s in seen for w in s]
    assert len(flat) == len(set(flat)) == len(ds) - len(ds) % world  # disjoint; all but a tail < world


def test_a_resume_from_state_dict_equals_continuing_and_fetches_nothing_it_skips(prepared, monkeypatch):
    ds = TokenDataset(prepared, "train", 16)
    loader = TokenLoader(ds, 2, seed=4)
    it = iter(loader)
    for _ in range(7):
        next(it)
    state = loader.state_dict()
    assert (state["epoch"], state["position"]) == (0, 7)
    rest = [x for x, _ in it]
    fetched = []
    real = TokenDataset.batch
    monkeypatch.setattr(TokenDataset, "batch", lambda self, idx: fetched.append(idx) or real(self, idx))
    fresh = TokenLoader(TokenDataset(prepared, "train", 16), 2, seed=4)
    fresh.load_state_dict(state)
    resumed = iter(fresh)
    assert torch.equal(next(resumed)[0], rest[0]) and len(fetched) == 1  # O(1): no replay of the 7
    assert all(torch.equal(a, b[0]) for a, b in zip(rest[1:], resumed))
    # deep into a big epoch: a position of 10**6 costs the same
    big = IndexPermutation(10**9, seed=1)
    assert 0 <= big(10**6) < 10**9
    with pytest.raises(CorpusError, match="loader state is for batch_size=2, this loader has batch_size=4"):
        TokenLoader(ds, 4, seed=4).load_state_dict(state)


def test_the_engine_stores_the_loaders_own_position_and_restores_it_without_replay(prepared, monkeypatch):
    from enginekit import Engine
    from enginekit.gpt import GPTModel

    def engine():
        torch.manual_seed(0)
        train, val = corpus_loaders(prepared, 2, 16, seed=3)
        model = GPTModel({**TINY_CFG, "drop_rate": 0.0})
        return Engine(model, torch.optim.SGD(model.parameters(), lr=0.1), train, val, device="cpu")

    reference = engine()
    reference.fit(max_steps=10)
    first = engine()
    first.fit(max_steps=6)
    state = first.state_dict()
    assert state["loader"][0]["position"] == 6 and state["loader"][0]["epoch"] == 0
    weights = {k: v.clone() for k, v in first.model.state_dict().items()}
    opt = first.optimizer.state_dict()
    fetched = []
    real = TokenDataset.batch
    monkeypatch.setattr(TokenDataset, "batch", lambda self, idx: fetched.append(idx) or real(self, idx))
    second = engine()
    second.model.load_state_dict(weights)
    second.optimizer.load_state_dict(opt)
    second.load_state_dict(state)
    second.fit(max_steps=10)
    assert len(fetched) == 4  # the 4 remaining steps' batches, none of the 6 done
    for a, b in zip(second.model.parameters(), reference.model.parameters()):
        assert torch.equal(a, b)


def test_a_loader_position_offered_to_a_plain_dataloader_is_a_clear_error(prepared):
    from enginekit import Engine
    from enginekit.data import create_dataloader

    model = torch.nn.Sequential(torch.nn.Embedding(50257, 4), torch.nn.Linear(4, 50257))
    train, _ = corpus_loaders(prepared, 2, 16)
    first = Engine(model, torch.optim.SGD(model.parameters(), lr=0.1), train, device="cpu")
    first.fit(max_steps=3)
    plain = create_dataloader(load_verdict(), batch_size=2, max_length=16, stride=16)
    second = Engine(model, torch.optim.SGD(model.parameters(), lr=0.1), plain, device="cpu")
    second.load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match=r"holds the training loader's own position .* \(DataLoader\) has none"):
        second.fit(max_steps=5)


def test_sigterm_mid_epoch_then_resume_ends_bit_identical_to_the_uninterrupted_run(tmp_path):
    job = ROOT / "tests" / "corpus_job.py"
    write_docs(tmp_path / "src", make_docs(25, words=12, seed=2))
    prepared = tmp_path / "corpus"
    prepare([tmp_path / "src"], prepared, shard_tokens=97, val_fraction=0.2, seed=1)  # 16 steps per epoch

    def run(out: Path, *flags: str) -> int:
        proc = subprocess.run(
            [sys.executable, str(job), str(prepared), str(out), *flags], capture_output=True, text=True, timeout=300
        )
        assert proc.returncode in (0, 143), proc.stderr
        return proc.returncode

    assert run(tmp_path / "whole") == 0
    whole = torch.load(tmp_path / "whole" / "result.pt", weights_only=True)
    term_at = whole["steps_per_epoch"] + 3  # mid second epoch
    assert run(tmp_path / "cut", "--term-at", str(term_at)) == 128 + signal.SIGTERM
    assert not (tmp_path / "cut" / "result.pt").exists()
    assert run(tmp_path / "cut", "--resume", "--workers", "2") == 0  # workers do not change the order
    cut = torch.load(tmp_path / "cut" / "result.pt", weights_only=True)
    assert cut["steps"] == whole["steps"] == 2 * whole["steps_per_epoch"]
    for key, value in whole["model"].items():
        assert torch.equal(value, cut["model"][key]), key
    assert cut["train_losses"] == whole["train_losses"] and cut["val_losses"] == whole["val_losses"]
    metrics = "metrics/metrics.jsonl"
    assert (tmp_path / "cut" / metrics).read_text() == (tmp_path / "whole" / metrics).read_text()
    # the data order: the cut run's steps, then the resumed run's, are the uninterrupted run's steps
    assert (tmp_path / "cut" / "order.txt").read_text() == (tmp_path / "whole" / "order.txt").read_text()


def test_under_torchrun_each_ranks_position_is_saved_and_restored_nothing_repeated_or_skipped(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs gloo")
    write_docs(tmp_path / "src", make_docs(25, words=12, seed=2))
    prepared = tmp_path / "corpus"
    prepare([tmp_path / "src"], prepared, shard_tokens=97, val_fraction=0.2, seed=1)
    job = ROOT / "tests" / "corpus_job.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(job)]
    out = tmp_path / "run"
    cut = subprocess.run(
        [*cmd, str(prepared), str(out), "--term-at", "11"], capture_output=True, text=True, timeout=300
    )
    assert cut.returncode != 0 and not (out / "result.pt").exists()
    engine_state = torch.load(out / "checkpoints" / "ckpt-00000012" / "state.pt", weights_only=True)["engine"]
    assert [s["rank"] for s in engine_state["loader"]] == [0, 1]  # each rank's own position
    assert [s["position"] for s in engine_state["loader"]] == [4, 4]  # 8 steps per epoch: mid second epoch
    done = subprocess.run([*cmd, str(prepared), str(out), "--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    ds = TokenDataset(prepared, "train", TINY_CFG["context_length"])
    for rank in (0, 1):
        loader = TokenLoader(ds, 2, seed=7, rank=rank, world_size=2)
        expected = []
        for step in range(2 * len(loader)):
            x = ds.batch(loader.windows_of_batch(step // len(loader), step % len(loader)))[0]
            expected.append(f"{step} {hashlib.sha256(x.numpy().tobytes()).hexdigest()[:16]}")
        assert (out / f"order-rank{rank}.txt").read_text().splitlines() == expected
