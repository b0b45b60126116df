"""Any batch shape, any task: forward_fn, nested device moves, token counts, clear shape errors."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from enginekit import Engine, hookimpl, lm_loss
from enginekit.batches import count_tokens, default_forward, to_device


class DictSet(Dataset):
    def __init__(self, n: int = 8) -> None:
        self.x = torch.randn(n, 3)
        self.y = (self.x.sum(1) > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"features": self.x[i], "mask": torch.ones(3), "label": self.y[i]}


def classifier_engine(loader, **kwargs) -> Engine:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    return Engine(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, device="cpu", **kwargs)


def test_dict_batches_with_a_forward_fn_train_evaluate_and_count():
    seen = []

    class Peek:
        @hookimpl
        def before_step(self, engine, batch):
            seen.append(sorted(batch))

    def forward(model, batch):
        assert batch["features"].device.type == "cpu"
        return model(batch["features"] * batch["mask"]), batch["label"]

    loader = DataLoader(DictSet(), batch_size=4)
    engine = classifier_engine(loader, forward_fn=forward, loss_fn=F.cross_entropy, plugins=[Peek()])
    engine.fit(epochs=2)
    assert engine.state.step == 4 and seen[0] == ["features", "label", "mask"]
    assert engine.state.tokens_seen == 4 * 4 * 3  # no input_ids: the first tensor, features (4 x 3) per step
    assert engine.evaluate(loader) > 0  # evaluation goes through forward_fn too


def test_three_part_batches_with_a_forward_fn():
    x = torch.randn(8, 3)
    loader = DataLoader(list(zip(x, torch.ones(8, 3), (x.sum(1) > 0).long())), batch_size=4)
    engine = classifier_engine(loader, forward_fn=lambda m, b: (m(b[0] * b[1]), b[2]), loss_fn=F.cross_entropy)
    engine.fit()
    assert engine.state.step == 2 and engine.state.tokens_seen == 2 * 4 * 3


def test_the_default_forward_names_its_contract_and_what_to_pass():
    loader = DataLoader(DictSet(), batch_size=4)
    with pytest.raises(ValueError) as info:
        classifier_engine(loader).fit()
    message = str(info.value)
    assert "the default forward_fn takes (inputs, targets) batches, but the loader gave a dict with keys" in message
    assert "forward_fn=f" in message


def test_the_default_lm_loss_names_its_contract_when_shapes_do_not_fit():
    x = torch.randn(8, 3)
    loader = DataLoader(list(zip(x, (x.sum(1) > 0).long())), batch_size=4)
    with pytest.raises(
        ValueError, match="lm_loss, the default loss_fn, expects next-token logits \\(batch, seq, vocab\\)"
    ):
        classifier_engine(loader).fit()
    with pytest.raises(ValueError, match="got logits \\(4, 2\\) and targets \\(4,\\)"):
        lm_loss(torch.randn(4, 2), torch.zeros(4, dtype=torch.long))


def test_to_device_walks_nested_batches_and_count_tokens_finds_the_inputs():
    Pair = namedtuple("Pair", "inputs targets")
    batch = {"input_ids": torch.ones(2, 5), "extra": [torch.zeros(1), (torch.zeros(2), "text")], "n": 3}
    moved = to_device(batch, torch.device("cpu"))
    assert moved["extra"][1][1] == "text" and moved["n"] == 3 and isinstance(moved["extra"][1], tuple)
    assert count_tokens(batch) == 10  # input_ids wins over the first value
    assert count_tokens((torch.ones(2, 4), torch.ones(2, 4))) == 8  # the book's input_batch.numel()
    assert isinstance(to_device(Pair(torch.ones(1), torch.ones(1)), torch.device("cpu")), Pair)
    assert count_tokens(["no tensors"]) == 0
    model = torch.nn.Identity()
    out, targets = default_forward(model, (torch.ones(2), torch.zeros(2)))
    assert torch.equal(out, torch.ones(2)) and torch.equal(targets, torch.zeros(2))


def test_a_batch_already_on_the_device_is_returned_as_is_and_a_moved_one_is_rebuilt():
    batch = (torch.ones(2, 3), [torch.zeros(2), "text"])
    assert to_device(batch, torch.device("cpu")) is batch  # no container rebuilt, nested ones included
    moved = to_device(batch, torch.device("meta"))
    assert moved is not batch and isinstance(moved, tuple) and isinstance(moved[1], list)
    assert moved[0].device.type == "meta" and moved[1][0].device.type == "meta" and moved[1][1] == "text"
    assert batch[0].device.type == "cpu"  # the original is untouched
    assert count_tokens(batch) == 6 and count_tokens(moved) == 6  # the inputs: the first tensor
    assert count_tokens(("text", torch.ones(4, 2))) == 8  # not first in the tuple: found by the walk
    assert count_tokens([]) == 0


def test_token_weights_are_each_micro_batchs_share_of_the_target_tokens():
    from enginekit.batches import token_weights

    def batch(n_targets: int, length: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        targets = torch.full((1, length), -100)
        targets[0, :n_targets] = 1
        return torch.zeros(1, length, dtype=torch.long), targets

    weights = token_weights([batch(2), batch(6), batch(8)], world_size=1, mean_over_ranks=None)
    assert weights.tolist() == [2 / 16, 6 / 16, 8 / 16]
    # two ranks whose totals average 16 (this one holds 8): 32 target tokens in the step, and DDP's
    # mean over ranks is undone by the world size
    two_ranks = token_weights([batch(2), batch(6)], world_size=2, mean_over_ranks=lambda t: t * 2)
    assert two_ranks.tolist() == [2 * 2 / 32, 6 * 2 / 32]
    assert token_weights([{"x": torch.zeros(2)}], world_size=1, mean_over_ranks=None) is None
