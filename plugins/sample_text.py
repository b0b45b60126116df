"""Print a greedy text sample after each epoch, as the book's ``generate_and_print_sample``."""

from __future__ import annotations

from typing import Any

import torch

from enginekit import Engine
from enginekit.data import gpt2_tokenizer
from enginekit.gpt import generate, text_to_token_ids, token_ids_to_text
from enginekit.hookspec import hookimpl
from enginekit.plugin_api import check_count


class SampleText:
    """After each epoch, greedily continue ``start_context`` by ``max_new_tokens`` tokens and print it.

    The model is switched to eval mode for generation and back to train mode afterwards; greedy
    decoding draws no random numbers, so sampling never changes the run. Newlines print as
    spaces, as in the book. ``samples`` keeps every printed text. Only rank 0 generates.
    """

    def __init__(
        self, start_context: str = "Every effort moves you", max_new_tokens: int = 50, tokenizer: Any = None
    ) -> None:
        if not start_context:
            raise ValueError("SampleText: start_context must be a non-empty string")
        check_count("SampleText: ", "max_new_tokens", max_new_tokens)
        self.start_context = start_context
        self.max_new_tokens = max_new_tokens
        self.tokenizer = tokenizer
        self.samples: list[str] = []

    @hookimpl
    def after_epoch(self, engine: Engine) -> None:
        if not engine.state.is_main:
            return
        model = engine.model
        tokenizer = self.tokenizer or gpt2_tokenizer()
        context_size = model.get_parameter("pos_emb.weight").shape[0]
        was_training = model.training
        model.eval()
        try:  # a failure must not leave dropout off for whoever carries on
            encoded = text_to_token_ids(self.start_context, tokenizer).to(engine.device)
            with torch.no_grad():
                token_ids = generate(model, encoded, self.max_new_tokens, context_size)
        finally:
            model.train(was_training)
        text = token_ids_to_text(token_ids, tokenizer).replace("\n", " ")
        self.samples.append(text)
        engine.print(text)
