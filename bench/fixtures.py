"""Models built offline from a config (random weights) for the quick run and the size sweep."""

from __future__ import annotations

from pathlib import Path

import common


def tiny_tokenizer(specials: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on the shipped text in a second or two."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(common.shipped_paragraphs(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def tiny_llama(path: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.eos_token, tok.bos_token, tok.unk_token = "<|im_end|>", "<|im_start|>", "<|endoftext|>"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_gpt2(path: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny_tokenizer(["<|endoftext|>"])
    tok.eos_token = tok.bos_token = tok.unk_token = "<|endoftext|>"
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tok), n_positions=1024, n_embd=64, n_layer=2, n_head=2,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def gpt2_small(path: Path, tokenizer_dir: str) -> Path:
    """GPT-2 small's config (124M, random weights) with SmolLM2's tokenizer (its ids fit GPT-2's vocabulary)."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = GPT2Config(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path
