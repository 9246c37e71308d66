"""Formatting and tokenizing records: text, completion, instruction and chat, with their loss masks.

Every example is a list of token ids and a list of labels (-100 where no loss is taken),
ending with the end-of-sequence token so the model learns to stop."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import chain

import numpy as np

from lorakit.data.tokens import IGNORE, TOKEN, Example, Tokens, offsets_of
from lorakit.errors import LorakitError, short

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ENCODE_BATCH_CHARS = 1 << 20  # text per batched tokenizer call: bounds the tokenizer's per-token objects
# A text longer than this is tokenized in pieces (a 50 MB file with no line break took 7.8 GB in one call), each cut
# before whitespace, where byte-level BPE pre-tokenizers split anyway: the ids are those of one call, except at a
# cut inside a run of several spaces, or in a text with no whitespace at all.
LONG_TEXT_CHARS = 1 << 18
PARALLELISM = "TOKENIZERS_PARALLELISM"
_PID = os.getpid()


def prompt_style(tokenizer, formats: set[str]) -> str:
    """How prompts are wrapped at generation time: 'chat', 'alpaca' or 'raw'."""
    if formats & {"chat", "instruction"}:
        return "chat" if tokenizer.chat_template else "alpaca"
    return "raw"


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


@contextmanager
def _all_cores() -> Iterator[None]:
    """Let the Rust tokenizer encode a batch on every core, then put TOKENIZERS_PARALLELISM back.

    The library reads the variable on each call. Once it is back to what it was ("false" under the
    CLI), processes forked later (data loader workers) keep off the thread pool, which a fork does
    not copy. In a process forked after this module was loaded the inherited pool may be unusable:
    leave the setting alone there.
    """
    before = os.environ.get(PARALLELISM)
    if os.getpid() == _PID:
        os.environ[PARALLELISM] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PARALLELISM, None)
        else:
            os.environ[PARALLELISM] = before


def fast_backend(tokenizer):
    """The Rust tokenizer behind a fast tokenizer, set up the way `tokenizer(texts)` sets it up."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return None
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    return backend


def _batches(texts: list[str]) -> Iterator[list[str]]:
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= ENCODE_BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode(tokenizer, texts: list[str], special: bool, eos: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of every text (+ `eos`), flat, and the offsets of each text's ids; one batched call per ~1 MB,
    a text longer than LONG_TEXT_CHARS in pieces (special tokens on its first piece, `eos` after its last)."""
    if all(len(t) <= LONG_TEXT_CHARS for t in texts):
        return _encode(tokenizer, texts, special, eos)
    parts, lengths, start = [], [], 0
    for end in [i for i, t in enumerate(texts) if len(t) > LONG_TEXT_CHARS] + [len(texts)]:
        if end > start:  # the short texts before this long one, in batches as usual
            ids, offsets = _encode(tokenizer, texts[start:end], special, eos)
            parts.append(ids)
            lengths += np.diff(offsets).tolist()
        if end < len(texts):
            pieces = text_pieces(texts[end])
            head, _ = _encode(tokenizer, pieces[:1], special)
            rest, _ = _encode(tokenizer, pieces[1:], False)
            tail = np.array([] if eos is None else [eos], TOKEN)
            parts += [head, rest, tail]
            lengths.append(len(head) + len(rest) + len(tail))
        start = end + 1
    return np.concatenate(parts), offsets_of(lengths)


def text_pieces(text: str, size: int | None = None) -> list[str]:
    """`text` cut into pieces of at most `size` (default LONG_TEXT_CHARS) characters, each cut just before
    whitespace where there is some in the second half of the piece (a text with none is cut where it must be)."""
    size = size or LONG_TEXT_CHARS
    pieces, start = [], 0
    while len(text) - start > size:
        window = text[start + size // 2 : start + size]
        cut = max(window.rfind(c) for c in " \n\t")
        end = start + size // 2 + cut if cut > 0 else start + size
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


def _encode(tokenizer, texts: list[str], special: bool, eos: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    backend = fast_backend(tokenizer)
    # The Rust tokenizer straight (no offsets, no attention masks) gives the ids `tokenizer(texts)` gives,
    # unless a tokenizer class adds rules of its own in Python: checked on the first texts.
    if backend is not None and texts:
        probe = texts[:8]
        fast = [e.ids for e in backend.encode_batch_fast(probe, add_special_tokens=special)]
        backend = backend if fast == tokenizer(probe, add_special_tokens=special)["input_ids"] else None
    tail = () if eos is None else (eos,)
    parts, lengths = [], []
    with _all_cores():
        for batch in _batches(texts):
            if backend is not None:
                rows = [e.ids for e in backend.encode_batch_fast(batch, add_special_tokens=special)]
            else:
                rows = tokenizer(batch, add_special_tokens=special)["input_ids"]
            sizes = [len(r) + len(tail) for r in rows]
            flat = chain.from_iterable(chain.from_iterable((r, tail) for r in rows))
            parts.append(np.fromiter(flat, TOKEN, sum(sizes)))
            lengths += sizes
    return (np.concatenate(parts) if parts else np.zeros(0, TOKEN)), offsets_of(lengths)


def _eos(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise LorakitError(
            "this tokenizer has no end-of-sequence token; set one (eos_token) in its tokenizer_config.json"
        )
    return tokenizer.eos_token_id


def text_tokens(tokenizer, texts: list[str]) -> Tokens:
    ids, offsets = encode(tokenizer, texts, special=True, eos=_eos(tokenizer))
    return Tokens.flat(ids, ids, offsets)


def tokenize_texts(tokenizer, texts: list[str]) -> list[Example]:
    return text_tokens(tokenizer, texts).examples()


def completion_tokens(tokenizer, pairs: list[tuple[str, str]]) -> Tokens:
    """Prompt (no loss) + completion + EOS for every pair, each side tokenized in one batched call."""
    p_ids, p_off = encode(tokenizer, [p for p, _ in pairs], special=True)
    c_ids, c_off = encode(tokenizer, [c for _, c in pairs], special=False, eos=_eos(tokenizer))
    p_len, c_len = np.diff(p_off), np.diff(c_off)
    offsets = offsets_of(p_len + c_len)
    at_prompt = np.arange(len(p_ids)) + np.repeat(offsets[:-1] - p_off[:-1], p_len)
    at_completion = np.arange(len(c_ids)) + np.repeat(offsets[:-1] + p_len - c_off[:-1], c_len)
    ids = np.empty(offsets[-1], TOKEN)
    ids[at_prompt], ids[at_completion] = p_ids, c_ids
    labels = ids.copy()
    labels[at_prompt] = IGNORE
    return Tokens.flat(ids, labels, offsets)


def tokenize_completion(tokenizer, prompt: str, completion: str) -> Example:
    return completion_tokens(tokenizer, [(prompt, completion)]).examples()[0]


def tokenize_chat(tokenizer, messages: list[dict]) -> Example:
    """Render with the chat template; loss on assistant turns only, through their end-of-turn token."""
    render = tokenizer.apply_chat_template
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        try:
            prefix = render(messages[:i], tokenize=False, add_generation_prompt=True)
            full = render(messages[: i + 1], tokenize=False)
        except Exception as e:  # jinja2's TemplateError, raised by templates that check the roles' order
            first = str(messages[0]["content"])[:60]
            raise LorakitError(
                f"the model's chat template refused a conversation ({short(e)}); it starts {first!r}"
            ) from None
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise LorakitError(
                "this chat template renders a conversation differently from its prefixes, so assistant "
                "turns cannot be located; use format: text for this data"
            )
        context = _ids(tokenizer, prefix[len(done) :], special=not done)
        answer = _ids(tokenizer, full[len(prefix) :], special=False)
        # Supervise the answer up to and including its end-of-turn token, not the whitespace after it.
        stop = _last_stop(answer, tokenizer)
        ids += context + answer
        labels += [IGNORE] * len(context) + answer[:stop] + [IGNORE] * (len(answer) - stop)
        done = full
    return Example(ids, labels)


def _last_stop(answer: list[int], tokenizer) -> int:
    stops = {tokenizer.eos_token_id}
    for i in range(len(answer) - 1, -1, -1):
        if answer[i] in stops:
            return i + 1
    return len(answer)


def format_tokens(tokenizer, records: list[dict], fmt: str) -> Tokens:
    if fmt == "text":
        return text_tokens(tokenizer, [r["text"] for r in records])
    if fmt == "completion":
        return completion_tokens(tokenizer, [(r["prompt"], r["completion"]) for r in records])
    if fmt == "chat" and not tokenizer.chat_template:
        raise LorakitError("format chat needs a tokenizer with a chat template; this model has none (use instruction)")
    if fmt == "instruction" and not tokenizer.chat_template:
        return completion_tokens(
            tokenizer, [(alpaca_prompt(r["instruction"], r["input"]), r["output"]) for r in records]
        )
    chats = [instruction_messages(r) for r in records] if fmt == "instruction" else [r["messages"] for r in records]
    return Tokens.from_examples([tokenize_chat(tokenizer, m) for m in chats])


def format_records(tokenizer, records: list[dict], fmt: str) -> list[Example]:
    return format_tokens(tokenizer, records, fmt).examples()


def instruction_messages(r: dict) -> list[dict]:
    user = r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    if input_text:
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT.format(instruction=instruction)


def chunk(examples: list[Example], block_size: int) -> list[Example]:
    """Split examples longer than a block; drop pieces with nothing to learn."""
    return Tokens.from_examples(examples).chunk(block_size).examples()
