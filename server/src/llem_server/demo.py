"""Build small random-weight models with tokenizers trained on the spot.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on a built-in text,
the model is a tiny Llama- or GPT-2-shaped network with random weights, and both are
written with ``save_pretrained`` so that the server loads them through the real
``from_pretrained`` path. Used by the README's demo, the tests and the benchmarks.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Mixed text so that the tokenizer learns merges and multi-byte characters
# (accents, CJK, emoji) end up split across tokens, which streaming must handle.
_CORPUS = """
The quick brown fox jumps over the lazy dog. Energy is measured in joules.
A GPU draws power while it generates tokens; the counter reports millijoules.
Large language models predict the next token from the tokens before it.
Batch size, precision and quantization change speed, energy and output.
Café, naïve, résumé, déjà vu. Grüße aus München. ¿Dónde está la biblioteca?
東京は日本の首都です。北京是中国的首都。안녕하세요. Привет, мир!
Emoji: 🙂 🚀 ⚡ 🔋 — math: ∑ ∫ ≤ ≥ π ≈ 3.14159.
def generate(prompt): return model.generate(**tokenizer(prompt, return_tensors="pt"))
Once upon a time there was a small model that wanted to be measured carefully.
""".strip().splitlines()

SPECIAL_LLAMA = {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": "<pad>"}
SPECIAL_GPT2 = {"eos": "<|endoftext|>"}


def _train_tokenizer(specials: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    return tok


def make_llama(out: Path, *, vocab_size: int = 512, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A Llama-style model whose tokenizer has a pad token but pads on the right."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    raw = _train_tokenizer(list(SPECIAL_LLAMA.values()), vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=SPECIAL_LLAMA["bos"],
        eos_token=SPECIAL_LLAMA["eos"],
        unk_token=SPECIAL_LLAMA["unk"],
        pad_token=SPECIAL_LLAMA["pad"],
        padding_side="right",  # the server must switch this to left
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_gpt2(out: Path, *, vocab_size: int = 512, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A GPT-2-style model whose tokenizer has no pad token and pads right, like GPT-2's."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    raw = _train_tokenizer(list(SPECIAL_GPT2.values()), vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=SPECIAL_GPT2["eos"],
        eos_token=SPECIAL_GPT2["eos"],
        unk_token=SPECIAL_GPT2["eos"],
        padding_side="right",
    )
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=hidden,
        n_layer=layers,
        n_head=4,
        n_positions=1024,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_llama_1b(out: Path, *, seed: int = 0) -> Path:
    """A Llama-3.2-1B-shaped model (1.24 B parameters, random weights) for GPU checks.

    Same shape as ``shared/gpu/anchor.py`` builds, with a small trained tokenizer;
    the vocabulary stays 128256 so that the per-token cost matches the anchor.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    raw = _train_tokenizer(list(SPECIAL_LLAMA.values()), 2048)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=SPECIAL_LLAMA["bos"],
        eos_token=SPECIAL_LLAMA["eos"],
        unk_token=SPECIAL_LLAMA["unk"],
        pad_token=SPECIAL_LLAMA["pad"],
    )
    config = LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
        rope_theta=500000.0, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


BUILDERS = {"llama": make_llama, "gpt2": make_gpt2, "llama-1b": make_llama_1b}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Make a small random-weight model with a tokenizer trained on the spot.")
    parser.add_argument("out", type=Path, help="directory to write (the model's name is its path under --model-root)")
    parser.add_argument("--kind", choices=sorted(BUILDERS), default="llama")
    args = parser.parse_args(argv)
    BUILDERS[args.kind](args.out)
    print(f"wrote a {args.kind} model to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
