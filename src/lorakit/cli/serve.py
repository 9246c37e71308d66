"""`lorakit serve`: every adapter of one base behind one OpenAI-compatible endpoint."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from lorakit.cli import StoreOpt, TrustOpt, app, console, quiet_libraries, say, user_errors
from lorakit.errors import LorakitError


def served_base(store: str, base: str | None) -> str:
    """The base to serve: `--base`, else the one base every adapter in the store was trained on."""
    if base:
        return base
    from lorakit.store import adapters

    bases = set()
    for row in adapters.list_adapters(store):
        try:
            meta = adapters.load_meta(store, row["name"])
        except LorakitError:
            continue
        if meta.recipe.base_model is not None:
            bases.add(meta.recipe.base_model.name)
    if len(bases) == 1:
        return bases.pop()
    if not bases:
        raise LorakitError(f"no adapter in {store} records its base model; name the model to serve with --base")
    raise LorakitError(f"the adapters in {store} have several bases ({', '.join(sorted(bases))}); pick one with --base")


@app.command()
@user_errors
def serve(
    base: Annotated[str | None, typer.Option(help="Base model (default: the one the store's adapters share).")] = None,
    engine: Annotated[str, typer.Option(help="auto or builtin (transformers + peft, for a laptop).")] = "auto",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(help="Require `Authorization: Bearer KEY` (also LORAKIT_API_KEY).", envvar="LORAKIT_API_KEY"),
    ] = None,
    max_adapters: Annotated[int, typer.Option(help="Adapters kept loaded (least recently used unloaded).")] = 8,
    max_batch: Annotated[int, typer.Option(help="Requests generated together at most.")] = 8,
    batch_wait_ms: Annotated[float, typer.Option(help="How long a request waits for others to batch with.")] = 20,
    max_tokens: Annotated[int, typer.Option(help="New tokens when a request gives no max_tokens.")] = 256,
    trust_remote_code: TrustOpt = False,
    store: StoreOpt = "adapters",
):
    """Serve the base model and every adapter of it in the store behind one OpenAI-compatible endpoint
    (/v1/models, /v1/completions, /v1/chat/completions); the request's `model` picks the adapter."""
    if engine not in ("auto", "builtin"):
        raise LorakitError(f"--engine must be auto or builtin, got {engine!r}")
    if not 0 < port < 65536:
        raise LorakitError(f"--port must be between 1 and 65535, got {port}")
    if max_adapters < 1 or max_batch < 1 or batch_wait_ms < 0 or max_tokens < 1:
        raise LorakitError("--max-adapters, --max-batch and --max-tokens must be at least 1, --batch-wait-ms 0 or more")
    quiet_libraries()
    import uvicorn

    from lorakit.serve.api import build_app
    from lorakit.serve.engine import Engine

    name = served_base(store, base)
    with console.status(f"loading {escape(name)}"):
        eng = Engine(store, name, max_adapters=max_adapters, max_batch=max_batch, batch_wait=batch_wait_ms / 1000,
                     trust_remote_code=trust_remote_code)  # fmt: skip
    names = sorted(eng.servable())
    say(f"engine: built-in (transformers + peft), {eng.loaded.plan.summary()[0].removeprefix('plan: ')}")
    say(f"serving {name} and {len(names)} adapter(s): {', '.join(names) or '(none yet)'}")
    say(f"OpenAI-compatible endpoint: http://{host}:{port}/v1" + (" (API key required)" if api_key else ""))
    uvicorn.run(build_app(eng, name, api_key, max_tokens), host=host, port=port, log_level="warning")
