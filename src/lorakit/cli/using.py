"""`lorakit generate`, `lorakit chat` and `lorakit eval`: using adapters."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from lorakit.cli import (
    StoreOpt,
    TrustOpt,
    app,
    console,
    err,
    new_table,
    quiet_libraries,
    say,
    user_errors,
)
from lorakit.errors import LorakitError


def passive_threads() -> None:
    """Let torch's OpenMP threads sleep, rather than spin, between operations (before torch loads; a
    user's own OMP_WAIT_POLICY wins). Generation runs many small operations; on a 2-core machine with
    another busy process, spinning threads made a 4-token prompt's first forward pass take 8.4 s
    instead of 0.22 s (measured)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# --- generate ---------------------------------------------------------------------------------


@app.command()
@user_errors
def generate(
    prompt: Annotated[str | None, typer.Argument(help="The prompt (or use --prompts FILE).")] = None,
    adapter: Annotated[
        list[str] | None, typer.Option(help="Adapter name in the store; repeat to compare several.")
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(
            help="A file of prompts, one per line, run as one mixed batch; a line may start with @NAME to pick "
            'its adapter (@base: the base model), or be JSON {"prompt": ..., "adapter": ...}.'
        ),
    ] = None,
    base_only: Annotated[bool, typer.Option("--base-only", help="Use the base model alone.")] = False,
    compare: Annotated[bool, typer.Option(help="Also show the base model's output for the same prompt.")] = False,
    base: Annotated[str | None, typer.Option(help="Base model reference (default: the adapter's).")] = None,
    style: Annotated[str | None, typer.Option(help="Prompt wrapping: chat, alpaca or raw.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=1_000_000)] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 for greedy decoding.")] = 0.7,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.9,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1)] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="--prompts: prompts per batch.")] = 16,
    as_json: Annotated[bool, typer.Option("--json", help="--prompts: one JSON line per prompt.")] = False,
    trust_remote_code: TrustOpt = False,
    store: StoreOpt = "adapters",
):
    """Generate text with one or more adapters (or the base model), streaming tokens to the terminal."""
    if not adapter and not base_only:
        raise LorakitError("name an adapter with --adapter NAME, or pass --base-only")
    if style not in (None, "chat", "alpaca", "raw"):
        raise LorakitError(f"--style must be chat, alpaca or raw, got {style!r}")
    if (prompt is None) == (prompts is None):
        raise LorakitError("give a prompt, or --prompts FILE (not both)")
    if prompt is not None and not prompt.strip():
        raise LorakitError("the prompt is empty; give the text to continue (or a question, for a chat adapter)")
    passive_threads()
    quiet_libraries()
    from lorakit.store import loader
    from lorakit.use import generate as gen

    opts = dict(style=style, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if prompts is not None:
        names = [] if base_only else list(adapter or [])
        items = gen.read_prompts(prompts, names[0] if names else None, names)
        loaded = loader.load(store, names, base, trust_remote_code=trust_remote_code)
        for i in range(0, len(items), batch_size):
            batch = items[i : i + batch_size]
            for j, (item, text) in enumerate(zip(batch, gen.generate_batch(loaded, batch, **opts), strict=True)):
                _show_batch_item(i + j + 1, item, text, as_json)
        return
    from transformers import TextStreamer

    loaded = loader.load(store, None if base_only else adapter, base, trust_remote_code=trust_remote_code)
    streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    outputs = [(n, f"adapter {n}") for n in loaded.adapters] or [(None, "base model")]
    if compare and loaded.adapters:
        outputs = [(None, "base model"), *outputs]
    for name, label in outputs:
        console.rule(f"[bold]{escape(label)}")
        gen.generate(loaded, prompt, adapter=name, use_adapter=name is not None, streamer=streamer, **opts)
        sys.stdout.flush()


def _show_batch_item(n: int, item, text: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"prompt": item.prompt, "adapter": item.adapter, "output": text}), flush=True)
        return
    console.rule(f"[bold]{n}. {escape(item.adapter or 'base model')}")
    console.print(f"[dim]{escape(item.prompt)}[/]", highlight=False)
    say(text)


@app.command()
@user_errors
def chat(
    adapter: Annotated[str | None, typer.Option(help="Adapter name in the store.")] = None,
    base_only: Annotated[bool, typer.Option("--base-only", help="Chat with the base model alone.")] = False,
    system: Annotated[str | None, typer.Option(help="A system message to start the conversation.")] = None,
    base: Annotated[str | None, typer.Option(help="Base model reference (default: the adapter's).")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=1_000_000)] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 for greedy decoding.")] = 0.7,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.9,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1)] = 0,
    trust_remote_code: TrustOpt = False,
    store: StoreOpt = "adapters",
):
    """Chat with an adapter, using its chat template. /reset starts over, /exit (or Ctrl-D) leaves."""
    if not adapter and not base_only:
        raise LorakitError("name an adapter with --adapter NAME, or pass --base-only")
    passive_threads()
    quiet_libraries()
    from transformers import TextStreamer

    from lorakit.store import loader
    from lorakit.use import generate as gen

    loaded = loader.load(store, None if base_only else adapter, base, verb="chat", trust_remote_code=trust_remote_code)
    if not loaded.tokenizer.chat_template:
        raise LorakitError(f"{adapter or 'the base model'} has no chat template; use `lorakit generate` instead")
    streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    err.print(f"chatting with {escape(adapter or 'the base model')}: /reset starts over, /exit or Ctrl-D leaves")
    turn = 0
    while True:
        try:
            line = console.input("[bold cyan]you>[/] ")
        except EOFError:
            console.print()
            return
        text = line.strip()
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            messages = list(start)
            err.print("(conversation cleared)")
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        console.print("[bold magenta]assistant>[/] ", end="")
        try:
            reply = gen.chat_reply(
                loaded, messages, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                seed=seed + turn, streamer=streamer,
            )  # fmt: skip
        except LorakitError as e:  # the conversation outgrew the model's context: say so, keep the session
            messages.pop()
            console.print()
            err.print(f"[yellow]{escape(str(e))}[/]; /reset starts a new conversation")
            continue
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": reply})
        turn += 1


# --- eval -------------------------------------------------------------------------------------


@app.command("eval")
@user_errors
def eval_(
    data: Annotated[Path, typer.Option("--data", help="Data file or folder to evaluate on.")],
    format_: Annotated[str, typer.Option("--format", help="text, completion, instruction or chat.")] = "text",
    adapter: Annotated[list[str] | None, typer.Option(help="Adapter name in the store; repeat for several.")] = None,
    base_only: Annotated[bool, typer.Option("--base-only", help="Include the base model alone.")] = False,
    model: Annotated[list[str] | None, typer.Option(help="A merged model folder; repeat for several.")] = None,
    base: Annotated[str | None, typer.Option(help="Base model reference (default: the adapters').")] = None,
    block_size: Annotated[int, typer.Option(min=2, help="Tokens per evaluated block.")] = 256,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    trust_remote_code: TrustOpt = False,
    store: StoreOpt = "adapters",
):
    """Loss and perplexity on a data file: base, adapters and merged models side by side."""
    quiet_libraries()
    from lorakit.use.evaluate import evaluate

    with console.status("evaluating"):
        rows = evaluate(
            data, format_, adapter, base_only, model, store=store, base=base, block_size=block_size,
            trust_remote_code=trust_remote_code,
        )  # fmt: skip
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = new_table("model", "loss", "perplexity", "tokens")
    for r in rows:
        table.add_row(escape(r["model"]), f"{r['loss']:.4f}", f"{r['perplexity']:.2f}", f"{r['tokens']:,}")
    console.print(table)
