"""GPT-2 weights in and out (enginekit.pretrained), against transformers' own GPT2LMHeadModel.

No network: every checkpoint is a small random GPT-2 built here. Its tensors are all randomized
(transformers initializes biases to 0 and norms to 1, which would hide a swapped bias or a
scale/shift mix-up), so every tensor of the mapping moves the logits.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from enginekit.gpt import GPTModel, crop_context, generate, load_pretrained, save_pretrained  # noqa: E402
from enginekit.pretrained import PretrainedFormatError  # noqa: E402

#: float32 logits of the two implementations differ by summation order only; measured: 2e-7..4e-7 here
ATOL = 1e-5
SMALL = dict(n_layer=2, n_embd=32, n_head=2, n_positions=64)


def randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return module


def hf_gpt2(tie: bool = True, seed: int = 0, **sizes: int) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**{**SMALL, **sizes}, tie_word_embeddings=tie)
    return randomized(transformers.GPT2LMHeadModel(config), seed).eval()


def random_ids(n: int = 64, batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 50257, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def hf_folder(tmp_path):
    model = hf_gpt2()
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("tie", [True, False])
def test_a_transformers_checkpoint_loads_with_equal_logits(tmp_path, tie):
    hf = hf_gpt2(tie=tie)
    hf.save_pretrained(tmp_path)
    files = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    assert ("lm_head.weight" in files) is not tie  # both layouts of the head are exercised
    model, cfg = load_pretrained(tmp_path, log=None)
    assert cfg == {
        "vocab_size": 50257,
        "context_length": 64,
        "emb_dim": 32,
        "n_heads": 2,
        "n_layers": 2,
        "drop_rate": 0.1,
        "qkv_bias": True,
    }
    assert model.training and all(p.requires_grad for p in model.parameters())  # ready to train
    ids = random_ids()
    with torch.no_grad():
        ours, theirs = model.eval()(ids), hf(ids).logits
    assert theirs.abs().max() > 1.0  # randomized weights give logits worth comparing
    assert max_diff(ours, theirs) < ATOL
    # no aliasing: the head is the embedding's values, not the same storage (training unties them)
    assert torch.equal(model.out_head.weight, hf.lm_head.weight)
    assert model.out_head.weight.data_ptr() != model.tok_emb.weight.data_ptr()


def test_openai_style_names_without_the_transformer_prefix_load_too(tmp_path, hf_folder):
    hf, folder = hf_folder
    tensors = safetensors_torch.load_file(str(folder / "model.safetensors"))
    # the hub's original GPT-2 files: bare names, and the old causal-mask buffers beside them
    bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    bare["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    (tmp_path / "bare").mkdir()
    safetensors_torch.save_file(bare, str(tmp_path / "bare" / "model.safetensors"))
    (tmp_path / "bare" / "config.json").write_text((folder / "config.json").read_text())
    model, _ = load_pretrained(tmp_path / "bare", log=None)
    ids = random_ids()
    with torch.no_grad():
        assert max_diff(model.eval()(ids), hf(ids).logits) < ATOL


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_an_enginekit_model_exports_to_transformers_with_equal_logits_and_greedy_text(tmp_path, qkv_bias):
    torch.manual_seed(0)
    cfg = {"vocab_size": 50257, "context_length": 48, "emb_dim": 32, "n_heads": 4, "n_layers": 2}
    model = randomized(GPTModel({**cfg, "drop_rate": 0.1, "qkv_bias": qkv_bias}), 3).eval()
    assert not torch.equal(model.out_head.weight, model.tok_emb.weight)  # as after training: untied
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["n_positions"] == 48 and config["n_head"] == 4
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = random_ids(48)
    with torch.no_grad():
        assert max_diff(hf(ids).logits, model(ids)) < ATOL
    prompt = ids[:1, :6]
    theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=50256)
    ours = generate(model, prompt, max_new_tokens=20, context_size=48)
    assert torch.equal(theirs, ours)


def test_round_trip_through_enginekit_leaves_every_hf_tensor_bit_identical(tmp_path, hf_folder):
    _, folder = hf_folder
    model, _ = load_pretrained(folder, log=None)
    save_pretrained(model, tmp_path / "again")
    before = safetensors_torch.load_file(str(folder / "model.safetensors"))
    after = safetensors_torch.load_file(str(tmp_path / "again" / "model.safetensors"))
    assert sorted(before) == sorted(after)  # tied in, tied out: no lm_head either side
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key
    old, new = (json.loads((d / "config.json").read_text()) for d in (folder, tmp_path / "again"))
    for key in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size", "tie_word_embeddings"):
        assert old[key] == new[key], key


def test_round_trip_through_hf_leaves_every_enginekit_tensor_bit_identical(tmp_path):
    cfg = {"vocab_size": 50257, "context_length": 32, "emb_dim": 32, "n_heads": 2, "n_layers": 3}
    model = randomized(GPTModel({**cfg, "drop_rate": 0.0, "qkv_bias": True}), 5)
    save_pretrained(model, tmp_path)
    back, back_cfg = load_pretrained(tmp_path, log=None)
    assert back_cfg == model.cfg
    before, after = model.state_dict(), back.state_dict()
    assert sorted(before) == sorted(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_a_safetensors_file_alone_needs_the_head_count_unless_it_is_a_gpt2_width(tmp_path, hf_folder):
    hf, folder = hf_folder
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"no config\.json .* pass n_heads="):
        load_pretrained(alone / "model.safetensors", log=None)
    lines: list[str] = []
    model, cfg = load_pretrained(alone / "model.safetensors", n_heads=2, log=lines.append)
    assert cfg["n_layers"] == 2 and cfg["emb_dim"] == 32 and cfg["context_length"] == 64
    ids = random_ids()
    with torch.no_grad():
        assert max_diff(model.eval()(ids), hf(ids).logits) < ATOL
    assert len(lines) == 1 and f"local file {alone / 'model.safetensors'}" in lines[0]
    # GPT-2's own widths imply the heads (124M: 768 wide, 12 heads); a tiny vocabulary keeps it small
    wide = GPTModel({"vocab_size": 8, "context_length": 4, "emb_dim": 768, "n_heads": 12, "n_layers": 1,
                     "drop_rate": 0.0, "qkv_bias": True})  # fmt: skip
    save_pretrained(wide, tmp_path / "wide")
    (tmp_path / "wide" / "config.json").unlink()
    lines.clear()
    _, cfg = load_pretrained(tmp_path / "wide", log=lines.append)
    assert cfg["n_heads"] == 12 and "n_heads assumed from GPT-2's width 768" in lines[0]


def test_a_file_that_is_not_gpt2_names_the_first_missing_or_misshaped_tensor(tmp_path, hf_folder):
    _, folder = hf_folder
    tensors = safetensors_torch.load_file(str(folder / "model.safetensors"))
    path = tmp_path / "model.safetensors"

    def attempt(edited: dict) -> str:
        safetensors_torch.save_file(edited, str(path))
        with pytest.raises(PretrainedFormatError) as info:
            load_pretrained(path, n_heads=2, log=None)
        message = str(info.value)
        assert "\n" not in message
        return message

    missing = {k: v for k, v in tensors.items() if k != "transformer.h.1.mlp.c_fc.bias"}
    assert "tensor 'h.1.mlp.c_fc.bias' is missing" in attempt(missing)
    misshaped = {**tensors, "transformer.h.0.attn.c_attn.weight": torch.zeros(32, 64)}
    assert "tensor 'h.0.attn.c_attn.weight' has shape [32, 64], expected [32, 96]" in attempt(misshaped)
    assert "tensor 'wte.weight' is missing" in attempt({"encoder.layer.0.weight": torch.zeros(4, 4)})
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(PretrainedFormatError, match="is not a readable safetensors file"):
        load_pretrained(path, n_heads=2, log=None)


def test_config_settings_the_book_model_cannot_compute_are_refused(tmp_path, hf_folder):
    _, folder = hf_folder
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(PretrainedFormatError, match="activation_function='relu'"):
        load_pretrained(folder, log=None)
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(PretrainedFormatError, match="model_type 'llama'"):
        load_pretrained(folder, log=None)


def test_pickles_are_refused_and_never_unpickled(tmp_path, monkeypatch):
    def no_unpickling(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    torch.save({"wte.weight": torch.zeros(2, 2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(PretrainedFormatError, match="no model.safetensors, only a pickle"):
        load_pretrained(tmp_path, log=None)
    with pytest.raises(PretrainedFormatError, match="safetensors only"):
        load_pretrained(tmp_path / "pytorch_model.bin", log=None)


def test_a_sharded_save_loads(tmp_path):
    hf = hf_gpt2()
    hf.save_pretrained(tmp_path, max_shard_size="2MB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    model, _ = load_pretrained(tmp_path, log=None)
    ids = random_ids()
    with torch.no_grad():
        assert max_diff(model.eval()(ids), hf(ids).logits) < ATOL


def offline_hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))


def test_a_hub_name_offline_says_to_download_elsewhere_and_pass_the_folder(tmp_path, monkeypatch):
    offline_hub(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)  # no folder called gpt2-medium here
    with pytest.raises(OSError) as info:
        load_pretrained("gpt2-medium", log=None)
    message = str(info.value)
    assert "'gpt2-medium' (openai-community/gpt2-medium)" in message
    assert "download it on a machine with network" in message and "pass its path" in message
    assert "\n" not in message
    with pytest.raises(FileNotFoundError, match="neither a path that exists nor a GPT-2 hub name"):
        load_pretrained("gtp2", log=None)


def test_a_local_folder_named_like_a_hub_id_is_used_and_said_so(tmp_path, monkeypatch):
    offline_hub(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    hf_gpt2().save_pretrained(tmp_path / "gpt2")
    lines: list[str] = []
    model, _ = load_pretrained("gpt2", log=lines.append)
    assert model.cfg["emb_dim"] == 32
    assert len(lines) == 1 and f"local folder {tmp_path / 'gpt2'}" in lines[0]
    assert "not the hub's 'gpt2'" in lines[0] and "'hub:gpt2'" in lines[0]
    with pytest.raises(OSError, match="could not download 'gpt2'"):  # hub: forces the download
        load_pretrained("hub:gpt2", log=None)


def test_a_shorter_context_keeps_the_first_positions_and_equal_logits(hf_folder):
    hf, folder = hf_folder
    model, cfg = load_pretrained(folder, context_length=16, log=None)
    assert cfg["context_length"] == 16 and model.pos_emb.weight.shape == (16, 32)
    assert model.trf_blocks[0].att.mask.shape == (16, 16)
    ids = random_ids(16)
    with torch.no_grad():
        assert max_diff(model.eval()(ids), hf(ids).logits) < ATOL
    full, _ = load_pretrained(folder, log=None)
    assert torch.equal(crop_context(full, 16).state_dict()["pos_emb.weight"], model.pos_emb.weight)
    with pytest.raises(ValueError, match="the model has 64 positions; pass 1..64"):
        load_pretrained(folder, context_length=65, log=None)


def test_save_pretrained_refuses_a_classifier_head(tmp_path, tiny_cfg):
    model = GPTModel(tiny_cfg)
    model.out_head = torch.nn.Linear(tiny_cfg["emb_dim"], 2)
    with pytest.raises(ValueError, match="out_head must map emb_dim to vocab_size"):
        save_pretrained(model, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_without_the_hf_extra_one_line_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ImportError, match=r"^GPT-2 weights in and out need the safetensors package: "
                       r"pip install 'enginekit\[hf\]'$"):  # fmt: skip
        load_pretrained(tmp_path, log=None)


def test_importing_enginekit_does_not_import_the_hf_packages():
    code = (
        "import sys, enginekit, enginekit.gpt, enginekit.data; "
        "print(sorted(m for m in ('safetensors', 'transformers', 'huggingface_hub', 'enginekit.pretrained') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --- the examples, end to end, from a converted random GPT-2 -----------------------------------


def example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finetune_classifier_from_a_converted_gpt2(tmp_path, hf_folder, capsys):
    from enginekit.plugins import Checkpoint

    _, folder = hf_folder
    converted, _ = load_pretrained(folder, log=None)
    out = tmp_path / "run"
    assert example("finetune_classifier").main(["--init", str(folder), "--out", str(out), "--epochs", "1"]) == 0
    assert f"GPT-2 weights from local folder {folder}" in capsys.readouterr().out
    from checkpoint_helpers import read_checkpoint

    payload = read_checkpoint(Checkpoint(out / "checkpoints").checkpoints()[0])
    trained, start = payload["model"], converted.state_dict()
    assert trained["out_head.weight"].shape == (2, 32) and "out_head.bias" in trained
    # the book's chapter 6: everything but the last block and the final norm stays GPT-2's, bit for bit
    frozen = [k for k in start if not k.startswith(("trf_blocks.1.", "final_norm.", "out_head."))]
    assert frozen and all(torch.equal(trained[k], start[k]) for k in frozen)
    assert not torch.equal(trained["trf_blocks.1.ff.layers.0.weight"], start["trf_blocks.1.ff.layers.0.weight"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and "val_accuracy" in rows[-1]


def test_pretrain_verdict_continues_from_gpt2_and_exports_a_transformers_folder(tmp_path, hf_folder, capsys):
    hf, folder = hf_folder
    converted, _ = load_pretrained(folder, log=None)
    out, export = tmp_path / "run", tmp_path / "export"
    argv = ["--init", str(folder), "--max-steps", "3", "--warmup-steps", "1", "--eval-freq", "2", "--no-sample"]
    assert example("pretrain_verdict").main([*argv, "--out", str(out), "--export", str(export)]) == 0
    printed = capsys.readouterr().out
    assert "context 64" in printed and f"Hugging Face GPT-2 folder in {export}" in printed
    trained = torch.load(out / "model.pt", weights_only=True)
    start = converted.state_dict()
    # three AdamW steps at lr <= 1e-3 move each weight by a few 1e-3 at most: it started from GPT-2's
    steps = {k: (trained[k] - start[k]).abs().max().item() for k in start if not k.endswith(".att.mask")}
    assert max(steps.values()) < 0.02 and min(steps.values()) >= 0 and any(s > 0 for s in steps.values())
    model = GPTModel(converted.cfg)
    model.load_state_dict(trained)
    exported = transformers.GPT2LMHeadModel.from_pretrained(export).eval()
    ids = random_ids()
    with torch.no_grad():
        assert max_diff(exported(ids).logits, model.eval()(ids)) < ATOL
        assert max_diff(exported(ids).logits, hf(ids).logits) > 1e-4  # the export holds the trained weights
    assert json.loads((export / "config.json").read_text())["tie_word_embeddings"] is False


def test_pretrain_verdict_init_errors_are_one_line_exit_2(tmp_path, capsys):
    assert example("pretrain_verdict").main(["--init", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --init: ") and "neither a path that exists" in err and "\n" not in err


def test_the_docs_python_blocks_run_as_written(tmp_path, monkeypatch, capsys):
    import re

    text = (ROOT / "docs" / "pretrained.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)  # the example writes its folders where it runs
    for code in blocks:
        exec(compile(code, "docs/pretrained.md", "exec"), {})
    assert (tmp_path / "tiny-gpt2-again" / "model.safetensors").exists()
    assert "GPT-2 weights from local folder" in capsys.readouterr().out



@pytest.mark.parametrize("name, flags", [("pretrain_verdict", ("--init", "--export", "--context-length")),
                                         ("finetune_classifier", ("--init",))])  # fmt: skip
def test_the_examples_help_explains_the_new_flags(name, flags, capsys):
    with pytest.raises(SystemExit):
        example(name).main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for flag in flags:
        assert flag in text
    assert "gpt2-medium" in text or "hub name" in text


def test_pretrain_verdict_export_that_cannot_be_written_keeps_model_pt(tmp_path, hf_folder, capsys):
    _, folder = hf_folder
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    argv = ["--init", str(folder), "--max-steps", "1", "--no-warmup", "--no-sample", "--no-eval"]
    assert example("pretrain_verdict").main([*argv, "--out", str(tmp_path / "run"), "--export", str(blocked)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: --export {blocked}: ")
    assert err.endswith(f"weights in {tmp_path / 'run' / 'model.pt'}")
    assert (tmp_path / "run" / "model.pt").exists() and blocked.read_text() == "not a folder"
