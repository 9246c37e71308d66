"""`lorakit plan --show-tokens N`: the first N training blocks as the trainer receives them (TRL's packing), trained
tokens lit, masked ones dimmed, document boundaries and end tokens marked; and the warnings that save a run: an
example whose end-of-turn or EOS token is outside the loss mask (the adapter never learns to stop), an example that
trains no token at all."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.text import Text

from lorakit.recipe import Recipe

# Tokens that end a turn or a text in common chat templates: an adapter must be trained on them to stop.
END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|end_of_text|>")


@dataclass
class Findings:
    untrained_end: list[int] = field(default_factory=list)  # examples whose end token after a trained span is masked
    nothing_trained: list[int] = field(default_factory=list)  # examples with no trained token
    examples: int = 0


def end_ids(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids |= {vocab[t] for t in END_TOKENS if t in vocab}
    return ids


def check_examples(ids_list, labels_list, ends: set[int]) -> Findings:
    """Every training example: does a trained span end on an untrained end token; does it train anything."""
    f = Findings(examples=len(ids_list))
    for n, (ids, labels) in enumerate(zip(ids_list, labels_list, strict=True)):
        trained = [lab != -100 for lab in labels]
        if not any(trained):
            f.nothing_trained.append(n)
            continue
        for i in range(len(ids) - 1):
            # a trained token followed by a masked end token: the turn's end is never learned
            if trained[i] and not trained[i + 1] and ids[i + 1] in ends:
                f.untrained_end.append(n)
                break
    return f


def render_block(tokenizer, ids, labels, seq_lengths, ends: set[int]) -> Text:
    out = Text()
    starts, pos = set(), 0
    for n in seq_lengths:
        starts.add(pos)
        pos += n
    doc = 0
    for i, (tok, lab) in enumerate(zip(ids, labels, strict=True)):
        if i in starts:
            doc += 1
            out.append(f"‖{doc}‖", style="bold cyan")
        piece = tokenizer.decode([tok])
        trained = lab != -100
        if tok in ends:
            out.append(f"[{piece or 'EOS'}]", style="bold green" if trained else "bold red")
            continue
        out.append(piece, style="green" if trained else "dim")
    return out


def show_blocks(recipe: Recipe, n: int, console) -> Findings:
    """Print the first `n` packed training blocks and the warnings over every training example."""
    from lorakit.data.prepare import prepare
    from lorakit.models.reference import resolve
    from lorakit.models.tokenizer import load_tokenizer

    ref = resolve(recipe.base_model.name, recipe.base_model.revision)
    tokenizer = load_tokenizer(ref, recipe.base_model.trust_remote_code)
    data = prepare(recipe.data, tokenizer, recipe.train.seed)
    train_ds, _ = data.datasets()
    ends = end_ids(tokenizer)
    if recipe.data.packing:
        from trl.data_utils import pack_dataset

        blocks = pack_dataset(train_ds, recipe.data.block_size, "bfd")
    else:
        blocks = train_ds.map(lambda row: {"seq_lengths": [len(row["input_ids"])]})
    console.print("legend: [green]trained[/], [dim]masked (no loss)[/], ‖n‖ a document's start, \\[x] an end token "
        "([bold green]trained[/] / [bold red]masked[/])", highlight=False)  # fmt: skip
    for b in range(min(n, len(blocks))):
        row = blocks[b]
        trained = sum(lab != -100 for lab in row["labels"])
        console.print(
            f"[bold]block {b + 1}[/] of {len(blocks)}: {len(row['seq_lengths'])} document(s), "
            f"{trained} of {len(row['input_ids'])} tokens trained"
        )
        console.print(render_block(tokenizer, row["input_ids"], row["labels"], row["seq_lengths"], ends))
    f = check_examples(train_ds["input_ids"], train_ds["labels"], ends)
    if f.untrained_end:
        console.print(
            f"[yellow]warning:[/] in {len(f.untrained_end)} of {f.examples} examples a trained span ends on an end "
            f"token outside the loss mask (e.g. example {f.untrained_end[0] + 1}): the adapter will not learn to "
            "stop. Train the end-of-turn token with the assistant's reply."
        )
    if f.nothing_trained:
        console.print(
            f"[yellow]warning:[/] {len(f.nothing_trained)} of {f.examples} examples train no token at all "
            f"(e.g. example {f.nothing_trained[0] + 1}): they cost compute and teach nothing"
        )
    if not f.untrained_end and not f.nothing_trained:
        console.print(
            f"checked {f.examples} examples: each trains some tokens, and every trained turn's end token is trained"
        )
    return f
