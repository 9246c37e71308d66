"""The OpenAI-compatible HTTP API over the built-in engine: /v1/models, /v1/completions and /v1/chat/completions,
with server-sent events for `stream: true` and an optional API key (`Authorization: Bearer KEY`)."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from lorakit.errors import LorakitError
from lorakit.serve.engine import Engine
from lorakit.serve.engine import Request as Job


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # other OpenAI fields are accepted and ignored

    model: str
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None


class CompletionBody(_Body):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Body):
    messages: list[ChatMessage]


def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status)


def build_app(engine: Engine, served_base: str, api_key: str | None = None, default_max_tokens: int = 256) -> FastAPI:
    """The app; `served_base` is the name the base model answers to."""
    app = FastAPI(title="lorakit serve")

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error(401, "invalid or missing API key (Authorization: Bearer KEY)", "authentication_error")
        return await call_next(request)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # never a traceback to the client
        return error(500, f"{type(exc).__name__}: {exc}", "server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        rows = [{"id": served_base, "object": "model", "created": now, "owned_by": "lorakit", "root": served_base}]
        for name in sorted(engine.servable()):
            rows.append({"id": name, "object": "model", "created": now, "owned_by": "lorakit", "root": served_base,
                         "parent": served_base})  # fmt: skip
        return {"object": "list", "data": rows}

    def resolve(model: str) -> str | None | JSONResponse:
        if model == served_base:
            return None
        if model in engine.servable():
            return model
        return error(404, f"the model {model!r} does not exist: serving {served_base!r} and the adapters listed at "
                     "/v1/models", code="model_not_found")  # fmt: skip

    def job(body: _Body, adapter: str | None, ids: list[int], events) -> Job:
        max_tokens = body.max_completion_tokens or body.max_tokens or default_max_tokens
        engine.check_length(len(ids), max_tokens)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return Job(body.model, adapter, ids, max_tokens, body.temperature, body.top_p, body.seed, stop, events)

    async def run(body: _Body, adapter, ids: list[int], chat: bool):
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()

        def events(kind: str, value: str) -> None:  # from the engine's thread
            loop.call_soon_threadsafe(out.put_nowait, (kind, value))

        try:
            j = job(body, adapter, ids, events)
        except LorakitError as e:
            return error(400, str(e))
        engine.submit(j)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def usage() -> dict:
            n = j.completion_tokens
            return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}

        def chunk(text: str | None, finish: str | None, first: bool = False) -> dict:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
                if text:
                    delta["content"] = text
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                        "choices": [choice]}  # fmt: skip
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                    "choices": [choice]}  # fmt: skip

        if body.stream:

            async def sse():
                if chat:
                    yield f"data: {json.dumps(chunk(None, None, first=True))}\n\n"
                while True:
                    kind_, value = await out.get()
                    if kind_ == "text":
                        yield f"data: {json.dumps(chunk(value, None))}\n\n"
                    elif kind_ == "done":
                        last = chunk(None, value)
                        if (body.model_extra or {}).get("stream_options", {}).get("include_usage"):
                            last["usage"] = usage()
                        yield f"data: {json.dumps(last)}\n\n"
                        break
                    else:
                        yield f"data: {json.dumps({'error': {'message': value, 'type': 'server_error'}})}\n\n"
                        break
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")
        text, finish = "", None
        while finish is None:
            kind_, value = await out.get()
            if kind_ == "text":
                text += value
            elif kind_ == "done":
                finish = value
            else:
                return error(500, value, "server_error")
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                      "logprobs": None}  # fmt: skip
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {"id": rid, "object": kind, "created": created, "model": body.model, "choices": [choice],
                "usage": usage()}  # fmt: skip

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        adapter = resolve(body.model)
        if isinstance(adapter, JSONResponse):
            return adapter
        if isinstance(body.prompt, list):
            if len(body.prompt) != 1:
                return error(400, "one prompt per request (send several requests: they are batched together)")
            body.prompt = body.prompt[0]
        ids = engine.tokenizer(body.prompt, add_special_tokens=True)["input_ids"]
        return await run(body, adapter, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody):
        adapter = resolve(body.model)
        if isinstance(adapter, JSONResponse):
            return adapter
        template = engine.chat_template(adapter)
        if not template:
            return error(400, f"{body.model!r} has no chat template; use /v1/completions")
        messages = []
        for m in body.messages:
            content = m.content
            if isinstance(content, list):  # content parts: the text ones
                content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
            messages.append({"role": m.role, "content": content or ""})
        text = engine.tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
        ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
        return await run(body, adapter, ids, chat=True)

    return app
