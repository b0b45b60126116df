"""GPT-2's weights in and out: Hugging Face GPT-2 checkpoints <-> the book's ``GPTModel``.

:func:`load_pretrained` reads a Hugging Face GPT-2 folder, a ``model.safetensors`` file or a hub
name and returns the book's model; :func:`save_pretrained` writes a folder that
``transformers.GPT2LMHeadModel.from_pretrained`` loads. Both are re-exported by
:mod:`enginekit.gpt`.

The mapping is the one of the book's ``load_weights_into_gpt`` (chapter 5):

* the fused ``c_attn`` projection is split in three along its output axis into ``W_query``,
  ``W_key`` and ``W_value`` (so the model has ``qkv_bias=True``);
* every ``Conv1D`` weight is stored input x output, the transpose of ``nn.Linear``'s;
* ``ln_1``/``ln_2``/``ln_f`` become ``norm1``/``norm2``/``final_norm`` (``weight``/``bias`` are
  ``scale``/``shift``);
* the output head gets the token embedding's values (GPT-2 ties them; enginekit's model does
  not, so after training the two differ and :func:`save_pretrained` writes ``lm_head.weight``
  with ``tie_word_embeddings: false``);
* the context length is the checkpoint's ``n_positions`` (1024 for OpenAI's GPT-2), and every
  other setting is the one the checkpoint implies.

Only safetensors files are read: a pickle (``pytorch_model.bin``) is refused, never unpickled.
``safetensors`` (and ``huggingface_hub`` for hub names) come with ``pip install 'enginekit[hf]'``;
``import enginekit`` does not need them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .gpt import GPTModel, normalize_config, padded_vocab_size, unpadded_state_dict

__all__ = [
    "GPT2_HEADS_BY_WIDTH",
    "HUB_NAMES",
    "PretrainedFormatError",
    "crop_context",
    "load_pretrained",
    "save_pretrained",
]

#: The hub names load_pretrained downloads, and the repository each one is stored under.
HUB_NAMES: dict[str, str] = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}

#: The number of heads can't be read off tensor shapes; for a bare ``model.safetensors`` without
#: ``config.json`` these are OpenAI's GPT-2 sizes (124M, 355M, 774M, 1558M) by embedding width.
GPT2_HEADS_BY_WIDTH: dict[int, int] = {768: 12, 1024: 16, 1280: 20, 1600: 25}

_HF_EXTRA = "pip install 'enginekit[hf]'"
_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_CONFIG = "config.json"


class PretrainedFormatError(ValueError):
    """A checkpoint that is not a GPT-2 this module can map (the message names the tensor or setting)."""


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError(f"GPT-2 weights in and out need the safetensors package: {_HF_EXTRA}") from None
    return safetensors.torch


# ---------------------------------------------------------------------------------------------
# Finding the files


def _hub_download(repo_id: str, name: str) -> tuple[Path, Path | None]:
    """Fetch (or find in the cache) one hub checkpoint: its weights file and its config."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ImportError(f"downloading {name!r} from the hub needs huggingface_hub: {_HF_EXTRA}") from None
    try:
        config = Path(hf_hub_download(repo_id, _CONFIG))
        weights = Path(hf_hub_download(repo_id, _WEIGHTS))
    except Exception as exc:  # offline, DNS, proxy, HTTP 5xx, a missing repository: huggingface_hub raises many kinds
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise OSError(
            f"could not download {name!r} ({repo_id}) from the Hugging Face hub ({type(exc).__name__}: {reason}); "
            f"offline? download it on a machine with network "
            f"(`hf download {repo_id} {_WEIGHTS} {_CONFIG} --local-dir {name.replace('/', '--')}`), copy the "
            "folder here and pass its path"
        ) from None
    return weights, config


def _resolve(source: str | os.PathLike[str]) -> tuple[list[Path], Path | None, str]:
    """The weights file(s), the config.json if any, and a phrase naming where they came from."""
    text = os.fspath(source)
    forced_hub = text.startswith("hub:")
    name = text[4:] if forced_hub else text
    path = Path(text)
    if not forced_hub and path.exists():
        origin = f"local {'folder' if path.is_dir() else 'file'} {path.resolve()}"
        if name in HUB_NAMES or name in HUB_NAMES.values():
            # transformers also prefers a local folder; the point is that the user hears about it
            origin += f" (not the hub's {name!r}: a path of that name exists here; pass 'hub:{name}' to download)"
        if path.is_dir():
            return _folder_files(path), (path / _CONFIG if (path / _CONFIG).is_file() else None), origin
        if path.suffix != ".safetensors":
            raise PretrainedFormatError(
                f"{path} is not a .safetensors file; enginekit loads GPT-2 weights from safetensors only "
                "(no pickles): pass a Hugging Face GPT-2 folder or its model.safetensors"
            )
        sibling = path.parent / _CONFIG
        return [path], (sibling if sibling.is_file() else None), origin
    repo_id = HUB_NAMES.get(name, name)
    if forced_hub or name in HUB_NAMES or name in HUB_NAMES.values():
        weights, config = _hub_download(repo_id, name)
        return [weights], config, f"the Hugging Face hub, {repo_id} (cached at {weights.parent})"
    raise FileNotFoundError(
        f"{text!r} is neither a path that exists nor a GPT-2 hub name ({', '.join(HUB_NAMES)}); "
        "pass a Hugging Face GPT-2 folder, its model.safetensors, a hub name or 'hub:OWNER/NAME'"
    )


def _folder_files(folder: Path) -> list[Path]:
    if (folder / _WEIGHTS).is_file():
        return [folder / _WEIGHTS]
    if (folder / _INDEX).is_file():  # a sharded save: the index maps each tensor to its shard
        weight_map = json.loads((folder / _INDEX).read_text())["weight_map"]
        return [folder / shard for shard in sorted(set(weight_map.values()))]
    if any((folder / n).is_file() for n in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")):
        raise PretrainedFormatError(
            f"{folder} has no {_WEIGHTS}, only a pickle or another framework's file, which enginekit "
            "does not load (unsafe to unpickle); convert it to safetensors first, e.g. with transformers: "
            "GPT2LMHeadModel.from_pretrained(folder).save_pretrained(new_folder)"
        )
    raise PretrainedFormatError(f"{folder} holds no {_WEIGHTS}: pass a Hugging Face GPT-2 folder")


# ---------------------------------------------------------------------------------------------
# Mapping


class _Tensors:
    """The tensors of a checkpoint (one or more safetensors files) under their bare GPT-2 names,
    read one at a time: shapes come from the headers, and a tensor is read only when mapped."""

    def __init__(self, files: list[Path]) -> None:
        st = _safetensors()
        self._where: dict[str, tuple[Any, str]] = {}
        for file in files:
            try:
                handle = st.safe_open(str(file), framework="pt")
            except Exception as exc:  # a truncated or foreign file: safetensors' own error, in one line
                raise PretrainedFormatError(f"{file} is not a readable safetensors file: {exc}") from None
            for name in handle.keys():
                # transformers saves GPT2LMHeadModel as transformer.*; OpenAI's hub files have bare names
                self._where[name.removeprefix("transformer.")] = (handle, name)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        handle, name = self._where[key]
        return tuple(handle.get_slice(name).get_shape())

    def load(self, key: str) -> torch.Tensor:
        handle, name = self._where[key]
        return handle.get_tensor(name)


def _own(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous float32 CPU tensor sharing no memory with it (nor with the file it came from)."""
    out = t.detach().to("cpu", torch.float32).contiguous()
    return out.clone() if out.data_ptr() == t.data_ptr() else out


def _check(tensors: _Tensors, key: str, shape: tuple[int, ...], where: str) -> torch.Tensor:
    if key not in tensors:
        raise PretrainedFormatError(f"{where} is not a GPT-2 checkpoint: tensor {key!r} is missing")
    found = tensors.shape(key)
    if found != shape:
        raise PretrainedFormatError(
            f"{where} is not a GPT-2 checkpoint of this size: tensor {key!r} has shape {list(found)}, "
            f"expected {list(shape)}"
        )
    tensor = tensors.load(key)
    if not tensor.is_floating_point():
        raise PretrainedFormatError(f"{where}: tensor {key!r} is {tensor.dtype}, expected floating point")
    return tensor


def _config_from(tensors: _Tensors, hf: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """The book-style config the checkpoint implies (everything but the head count comes from shapes)."""
    for key in ("wte.weight", "wpe.weight"):
        if key not in tensors:
            raise PretrainedFormatError(f"{where} is not a GPT-2 checkpoint: tensor {key!r} is missing")
        if len(tensors.shape(key)) != 2:
            raise PretrainedFormatError(
                f"{where} is not a GPT-2 checkpoint: tensor {key!r} has shape {list(tensors.shape(key))}, expected 2-D"
            )
    vocab, width = tensors.shape("wte.weight")
    positions = tensors.shape("wpe.weight")[0]
    blocks = {int(m.group(1)) for k in tensors.keys() if (m := re.match(r"h\.(\d+)\.", k))}
    n_layers = max(blocks) + 1 if blocks else 0
    if n_layers == 0:
        raise PretrainedFormatError(f"{where} is not a GPT-2 checkpoint: tensor 'h.0.ln_1.weight' is missing")
    cfg: dict[str, Any] = {
        "vocab_size": int(vocab),
        "context_length": int(positions),
        "emb_dim": int(width),
        "n_heads": None,
        "n_layers": n_layers,
        "drop_rate": 0.1,  # GPT-2's resid/embd/attn dropout
        "qkv_bias": True,
    }
    if hf is not None:
        _check_hf_config(hf, cfg, where)
        cfg["n_heads"] = int(hf["n_head"]) if "n_head" in hf else None
        cfg["drop_rate"] = float(hf.get("resid_pdrop", cfg["drop_rate"]))
    return cfg


def _check_hf_config(hf: Mapping[str, Any], cfg: Mapping[str, Any], where: str) -> None:
    """Refuse the config.json settings the book's model can't reproduce, one setting per message."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise PretrainedFormatError(f"{where}: config.json says model_type {hf['model_type']!r}, not 'gpt2'")
    for key, ours in (("n_embd", cfg["emb_dim"]), ("n_layer", cfg["n_layers"]), ("vocab_size", cfg["vocab_size"])):
        if key in hf and hf[key] != ours:
            raise PretrainedFormatError(f"{where}: config.json says {key}={hf[key]} but the tensors imply {ours}")
    expected = {
        "activation_function": "gelu_new",  # the tanh GELU of the book
        "layer_norm_epsilon": 1e-5,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
    }
    for key, value in expected.items():
        if key in hf and hf[key] != value and not (key == "activation_function" and hf[key] == "gelu_pytorch_tanh"):
            raise PretrainedFormatError(
                f"{where}: config.json sets {key}={hf[key]!r}; the book's GPTModel computes {key}={value!r}"
            )
    if hf.get("n_inner") not in (None, 4 * cfg["emb_dim"]):
        raise PretrainedFormatError(
            f"{where}: config.json sets n_inner={hf['n_inner']}; the book's GPTModel uses 4 x n_embd"
        )


def _book_state_dict(tensors: _Tensors, cfg: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    """GPT-2 tensors -> the book's state-dict keys, checked in order so the first bad one is named.

    Each tensor is read, converted to storage of its own and dropped, one at a time: a load
    peaks near one model's size plus a tensor, not a file's size plus a model's (gpt2-xl: 6 GB).
    """
    e, v = cfg["emb_dim"], cfg["vocab_size"]

    def get(key: str, *shape: int) -> torch.Tensor:
        return _check(tensors, key, shape, where)

    out: dict[str, torch.Tensor] = {
        "tok_emb.weight": _own(get("wte.weight", v, e)),
        "pos_emb.weight": _own(get("wpe.weight", cfg["context_length"], e)),
    }
    for i in range(cfg["n_layers"]):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        out[b + "norm1.scale"] = _own(get(h + "ln_1.weight", e))
        out[b + "norm1.shift"] = _own(get(h + "ln_1.bias", e))
        # Conv1D keeps weights as in x out: split the fused projection along its outputs, then transpose
        q, k, val = torch.split(get(h + "attn.c_attn.weight", e, 3 * e), e, dim=1)
        qb, kb, vb = torch.split(get(h + "attn.c_attn.bias", 3 * e), e, dim=0)
        out[b + "att.W_query.weight"], out[b + "att.W_query.bias"] = _own(q.T), _own(qb)
        out[b + "att.W_key.weight"], out[b + "att.W_key.bias"] = _own(k.T), _own(kb)
        out[b + "att.W_value.weight"], out[b + "att.W_value.bias"] = _own(val.T), _own(vb)
        out[b + "att.out_proj.weight"] = _own(get(h + "attn.c_proj.weight", e, e).T)
        out[b + "att.out_proj.bias"] = _own(get(h + "attn.c_proj.bias", e))
        out[b + "norm2.scale"] = _own(get(h + "ln_2.weight", e))
        out[b + "norm2.shift"] = _own(get(h + "ln_2.bias", e))
        out[b + "ff.layers.0.weight"] = _own(get(h + "mlp.c_fc.weight", e, 4 * e).T)
        out[b + "ff.layers.0.bias"] = _own(get(h + "mlp.c_fc.bias", 4 * e))
        out[b + "ff.layers.2.weight"] = _own(get(h + "mlp.c_proj.weight", 4 * e, e).T)
        out[b + "ff.layers.2.bias"] = _own(get(h + "mlp.c_proj.bias", e))
    out["final_norm.scale"] = _own(get("ln_f.weight", e))
    out["final_norm.shift"] = _own(get("ln_f.bias", e))
    # GPT-2 ties the head to the token embedding (no lm_head in the file); an untied save has its own.
    # Either way the head gets storage of its own: training the book's model unties them.
    if "lm_head.weight" in tensors:
        out["out_head.weight"] = _own(get("lm_head.weight", v, e))
    else:
        out["out_head.weight"] = out["tok_emb.weight"].clone()
    return out


def load_pretrained(
    source: str | os.PathLike[str],
    *,
    n_heads: int | None = None,
    context_length: int | None = None,
    drop_rate: float | None = None,
    log: Callable[[str], None] | None = print,
) -> tuple[GPTModel, dict[str, Any]]:
    """Load a Hugging Face GPT-2 checkpoint into the book's :class:`~enginekit.gpt.GPTModel`.

    ``source``: a local Hugging Face GPT-2 folder (``model.safetensors`` or a sharded
    ``model.safetensors.index.json``, with ``config.json``), a ``.safetensors`` file on its own,
    or a hub name (``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``; ``hub:OWNER/NAME``
    for any GPT-2 repository) downloaded with ``huggingface_hub``. A path that exists wins over
    a hub name of the same spelling, and the line logged says so.

    The config is the one the checkpoint implies (vocabulary, width, layers and context from the
    tensor shapes; heads and dropout from ``config.json``). Without ``config.json``, ``n_heads``
    must be given unless the width is one of OpenAI's GPT-2 sizes (:data:`GPT2_HEADS_BY_WIDTH`).
    ``context_length`` below the checkpoint's ``n_positions`` keeps the first position rows (a
    model for shorter windows, exactly equal on them); ``drop_rate`` overrides the dropout.
    ``log`` receives one line saying what was loaded from where (``None``: silent).

    Returns ``(model, config)``: the model in train mode on the CPU in float32, and its
    book-style config dict (``model.cfg``). Raises :class:`PretrainedFormatError` (a
    ``ValueError``) with one line naming the first missing or mis-shaped tensor, ``OSError``
    when a hub name can't be downloaded, ``ImportError`` when the ``hf`` extra is missing.
    """
    files, config_file, origin = _resolve(source)
    where = str(files[0]) if len(files) == 1 else str(files[0].parent)
    tensors = _Tensors(files)
    hf = json.loads(config_file.read_text()) if config_file is not None else None
    cfg = _config_from(tensors, hf, where)
    assumed = ""
    if n_heads is not None:
        if cfg["n_heads"] is not None and cfg["n_heads"] != n_heads:
            raise ValueError(f"n_heads={n_heads} but {config_file} says n_head={cfg['n_heads']}; drop n_heads")
        cfg["n_heads"] = n_heads
    elif cfg["n_heads"] is None:
        if cfg["emb_dim"] not in GPT2_HEADS_BY_WIDTH:
            raise ValueError(
                f"{where} has no config.json beside it and the head count can't be read off tensor shapes: "
                f"pass n_heads= (width {cfg['emb_dim']} is none of GPT-2's {sorted(GPT2_HEADS_BY_WIDTH)})"
            )
        cfg["n_heads"] = GPT2_HEADS_BY_WIDTH[cfg["emb_dim"]]
        assumed = f" (n_heads assumed from GPT-2's width {cfg['emb_dim']}: no config.json)"
    state = _book_state_dict(tensors, cfg, where)
    if drop_rate is not None:
        cfg["drop_rate"] = drop_rate
    if context_length is not None:
        _check_context(context_length, cfg["context_length"])
        state["pos_emb.weight"] = state["pos_emb.weight"][:context_length].clone()
        cfg["context_length"] = context_length
    model = _build(normalize_config(cfg), state)
    cfg = dict(model.cfg)
    if log is not None:
        log(
            f"GPT-2 weights from {origin}: {cfg['n_layers']} layers, width {cfg['emb_dim']}, "
            f"{cfg['n_heads']} heads, context {cfg['context_length']}, vocabulary {cfg['vocab_size']}{assumed}"
        )
    return model, cfg


def _check_context(context_length: int, positions: int) -> None:
    if isinstance(context_length, bool) or not isinstance(context_length, int) or not 1 <= context_length <= positions:
        raise ValueError(f"context_length={context_length!r}: the model has {positions} positions; pass 1..{positions}")


def _build(cfg: dict[str, Any], state: dict[str, torch.Tensor]) -> GPTModel:
    """A GPTModel that takes ``state``'s tensors as its parameters (no copy: they must be its own)."""
    # Built on the meta device: no random init to throw away (seconds for gpt2-xl), no RNG drawn
    with torch.device("meta"):
        model = GPTModel(cfg)
    n = cfg["context_length"]
    state = {k: t for k, t in state.items() if not k.endswith(".att.mask")}
    for i in range(cfg["n_layers"]):
        state[f"trf_blocks.{i}.att.mask"] = torch.triu(torch.ones(n, n), diagonal=1)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def crop_context(model: GPTModel, context_length: int) -> GPTModel:
    """A copy of ``model`` for windows of at most ``context_length`` tokens (the first position rows).

    On inputs that short, its outputs equal the original's exactly: a causal model never reads the
    positions it drops. The book's GPT-2 runs use 1024; appendix D's data needs 256.
    """
    _check_context(context_length, model.context_length)
    state = {k: _own(t) for k, t in model.state_dict().items() if not k.endswith(".att.mask")}
    state["pos_emb.weight"] = state["pos_emb.weight"][:context_length].clone()
    return _build({**model.cfg, "context_length": context_length}, state)


# ---------------------------------------------------------------------------------------------
# Export


def _hf_tensors(model: GPTModel) -> tuple[dict[str, torch.Tensor], bool]:
    """The book's state dict -> GPT2LMHeadModel's safetensors names (the inverse of _book_state_dict)."""
    # a head padded for speed (vocab_padding_multiple) goes out at the vocabulary's size
    sd = {k: v.detach().to("cpu") for k, v in unpadded_state_dict(model).items()}
    cfg = model.cfg
    e = cfg["emb_dim"]
    out: dict[str, torch.Tensor] = {
        "transformer.wte.weight": sd["tok_emb.weight"],
        "transformer.wpe.weight": sd["pos_emb.weight"],
    }
    for i in range(cfg["n_layers"]):
        h, b = f"transformer.h.{i}.", f"trf_blocks.{i}."
        out[h + "ln_1.weight"], out[h + "ln_1.bias"] = sd[b + "norm1.scale"], sd[b + "norm1.shift"]
        qkv = [sd[b + f"att.{w}.weight"].T for w in ("W_query", "W_key", "W_value")]
        out[h + "attn.c_attn.weight"] = torch.cat(qkv, dim=1)
        # GPT-2's c_attn always has a bias; a model built with qkv_bias=False computes the same with zeros
        zero = torch.zeros(e, dtype=qkv[0].dtype)
        biases = [sd.get(b + f"att.{w}.bias", zero) for w in ("W_query", "W_key", "W_value")]
        out[h + "attn.c_attn.bias"] = torch.cat(biases)
        out[h + "attn.c_proj.weight"] = sd[b + "att.out_proj.weight"].T
        out[h + "attn.c_proj.bias"] = sd[b + "att.out_proj.bias"]
        out[h + "ln_2.weight"], out[h + "ln_2.bias"] = sd[b + "norm2.scale"], sd[b + "norm2.shift"]
        out[h + "mlp.c_fc.weight"] = sd[b + "ff.layers.0.weight"].T
        out[h + "mlp.c_fc.bias"] = sd[b + "ff.layers.0.bias"]
        out[h + "mlp.c_proj.weight"] = sd[b + "ff.layers.2.weight"].T
        out[h + "mlp.c_proj.bias"] = sd[b + "ff.layers.2.bias"]
    out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = sd["final_norm.scale"], sd["final_norm.shift"]
    # Training the book's model unties the head; then it is saved as its own tensor
    tied = torch.equal(sd["out_head.weight"], sd["tok_emb.weight"])
    if not tied:
        out["lm_head.weight"] = sd["out_head.weight"]
    return {k: v.contiguous().clone() for k, v in out.items()}, tied


def save_pretrained(model: torch.nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write ``model`` (the book's GPTModel) as a Hugging Face GPT-2 folder; returns the folder.

    The folder holds ``model.safetensors`` and ``config.json`` that
    ``transformers.GPT2LMHeadModel.from_pretrained(directory)`` loads, and that
    :func:`load_pretrained` reads back bit for bit. The output head is written as
    ``lm_head.weight`` with ``tie_word_embeddings: false`` unless it equals the token embedding
    (GPT-2's tying). A ``torch.compile``-d or DDP-wrapped model is unwrapped. A model whose head
    is not the language-model head (chapter 6's classifier) is refused: GPT-2 has no such layout.
    """
    st = _safetensors()
    inner = getattr(model, "_orig_mod", model)
    inner = getattr(inner, "module", inner)
    if not isinstance(inner, GPTModel):
        raise TypeError(f"save_pretrained writes the book's GPTModel, got {type(inner).__name__}")
    cfg = inner.cfg
    head = inner.out_head
    rows = padded_vocab_size(cfg["vocab_size"], cfg.get("vocab_padding_multiple"))
    if not isinstance(head, torch.nn.Linear) or tuple(head.weight.shape) != (rows, cfg["emb_dim"]):
        raise ValueError(
            "save_pretrained writes a language model: out_head must map emb_dim to vocab_size "
            f"({cfg['emb_dim']} -> {cfg['vocab_size']}); this model's head is {head}"
        )
    if head.bias is not None:
        raise ValueError("save_pretrained: out_head has a bias, which GPT-2's lm_head does not; it would be lost")
    tensors, tied = _hf_tensors(inner)
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = str(tensors["transformer.wte.weight"].dtype).removeprefix("torch.")
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg["vocab_size"],
        "n_positions": cfg["context_length"],
        "n_embd": cfg["emb_dim"],
        "n_layer": cfg["n_layers"],
        "n_head": cfg["n_heads"],
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": cfg["drop_rate"],
        "embd_pdrop": cfg["drop_rate"],
        "attn_pdrop": cfg["drop_rate"],
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "tie_word_embeddings": tied,
        "dtype": dtype,
        "torch_dtype": dtype,  # the name transformers 4.x reads
    }
    # temporary names + os.replace: a crash mid-write leaves the previous export, not half of one
    tmp = folder / f".{_WEIGHTS}.tmp"
    st.save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / _WEIGHTS)
    tmp = folder / f".{_CONFIG}.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, folder / _CONFIG)
    return folder
