"""How closely the book's GPTModel and transformers' GPT2LMHeadModel agree on the same weights.

Random GPT-2s of OpenAI's shapes (no download): every tensor is perturbed so biases and norms
matter too. For each size: HF -> enginekit (load_pretrained) and enginekit -> HF
(save_pretrained after the head is untied, as training leaves it), the max abs difference of
float32 logits in eval mode on random token ids, and whether greedy generation picks the same
tokens. Needs the hf extra: pip install 'enginekit[hf]'.

    python benchmarks/pretrained_agreement.py                 # tiny and 124M shapes
    python benchmarks/pretrained_agreement.py --sizes 124M 355M --tokens 256
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import transformers

from enginekit.gpt import generate, load_pretrained, save_pretrained

SIZES = {  # n_layer, n_embd, n_head, as OpenAI's releases (tiny: the tests' size)
    "tiny": (2, 32, 2),
    "124M": (12, 768, 12),
    "355M": (24, 1024, 16),
    "774M": (36, 1280, 20),
}


def perturb(module: torch.nn.Module, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def measure(size: str, tokens: int, folder: Path) -> dict[str, object]:
    n_layer, n_embd, n_head = SIZES[size]
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head))
    perturb(hf, 0.02, 1)  # GPT-2's init scale, applied to biases and norms as well
    hf.eval().save_pretrained(folder / "hf")
    model, _ = load_pretrained(folder / "hf", log=None)
    model.eval()
    ids = torch.randint(0, 50257, (2, tokens), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs, ours = hf(ids).logits, model(ids)
        hf_to_ek = (theirs - ours).abs().max().item()
        spread = theirs.abs().max().item()
        with torch.no_grad():  # untie the head, as training does, so lm_head travels on its own
            model.out_head.weight.add_(torch.randn_like(model.out_head.weight) * 0.02)
        save_pretrained(model, folder / "ek")
        back = transformers.GPT2LMHeadModel.from_pretrained(folder / "ek").eval()
        ek_to_hf = (back(ids).logits - model(ids)).abs().max().item()
        prompt = ids[:1, :8]
        same = torch.equal(
            back.generate(prompt, max_new_tokens=30, do_sample=False, pad_token_id=50256),
            generate(model, prompt, max_new_tokens=30, context_size=1024),
        )
    return {"size": size, "hf_to_ek": hf_to_ek, "ek_to_hf": ek_to_hf, "max_logit": spread, "greedy_same": same}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["tiny", "124M"])
    p.add_argument("--tokens", type=int, default=128, help="tokens per sequence (batch of 2)")
    args = p.parse_args()
    transformers.logging.set_verbosity_error()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, float32 CPU, 2 x {args.tokens} ids")
    print(f"{'size':>6} {'HF->enginekit':>14} {'enginekit->HF':>14} {'max |logit|':>12} {'greedy 30 same':>15}")
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            r = measure(size, args.tokens, Path(tmp))
        print(
            f"{r['size']:>6} {r['hf_to_ek']:>14.2e} {r['ek_to_hf']:>14.2e} {r['max_logit']:>12.2f} "
            f"{r['greedy_same']!s:>15}"
        )


if __name__ == "__main__":
    main()
