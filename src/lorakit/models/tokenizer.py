"""Loading a base model's tokenizer, with a pad token that is not EOS where the vocabulary has one."""

from __future__ import annotations

from lorakit.errors import LorakitError, short
from lorakit.models.reference import ModelRef


def load_tokenizer(ref: ModelRef, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(ref.path, trust_remote_code=trust_remote_code, **ref.load_args)
    except (OSError, ValueError) as e:
        raise LorakitError(f"could not load the tokenizer of {ref.label}: {short(e)}") from None
    fix_pad_token(tok)
    return tok


def fix_pad_token(tok) -> str:
    """Give the tokenizer a pad token that is not EOS where the vocabulary has one.

    lorakit builds labels from explicit masks, never by comparing ids with the pad id, so even
    where pad must stay EOS (GPT-2 has no other special token) EOS is still learned.
    """
    if tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id:
        return "kept"
    for cand in (tok.unk_token, "<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "<|endoftext|>"):
        if cand and cand != tok.eos_token and cand in tok.get_vocab():
            tok.pad_token = cand
            return f"set to {cand!r}"
    tok.pad_token = tok.eos_token
    return "EOS (no other special token; labels are masked explicitly)"
