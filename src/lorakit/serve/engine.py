"""The built-in serving engine: one base model in memory and any adapter of the store per request.

Adapters load on first use (peft's `load_adapter`) and stay up to `max_adapters`, the least recently used unloaded
first; the store is read again on every request, so an adapter trained while the server runs is servable at once.
Requests that arrive within `batch_wait` seconds of each other (up to `max_batch`) and share their sampling
settings run as one batch, each row with its own adapter (peft's mixed-batch `adapter_names`); tokens stream back
to each request as they are generated."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from lorakit.errors import LorakitError
from lorakit.store import adapters, loader

log = logging.getLogger("lorakit")
BASE_ROW = "__base__"  # peft's name for a row without adapter in a mixed batch


@dataclass
class Request:
    model: str  # the name it was asked for: an adapter, or the base's served name
    adapter: str | None  # None: the base model
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    events: Any  # called with ("text", str), ("done", finish_reason) or ("error", message), from the engine thread
    completion_tokens: int = 0
    text: str = ""
    finished: str | None = None
    ids: list[int] = field(default_factory=list)

    @property
    def sampling(self) -> tuple:
        return (self.temperature > 0, round(self.temperature, 6), round(self.top_p, 6), self.seed)


class _Rows(BaseStreamer):
    """transformers' streamer interface for a whole batch: each new token goes to its row's request."""

    def __init__(self, engine: Engine, requests: list[Request]):
        self.engine, self.requests, self.first = engine, requests, True

    def put(self, value):
        if self.first:  # the prompt
            self.first = False
            return
        for req, tok in zip(self.requests, value.view(-1).tolist(), strict=True):
            self.engine.step(req, int(tok))

    def end(self):
        for req in self.requests:
            self.engine.finish(req, "length")


class Engine:
    def __init__(
        self,
        store: str,
        base: str,
        *,
        max_adapters: int = 8,
        max_batch: int = 8,
        batch_wait: float = 0.02,
        trust_remote_code: bool = False,
    ):
        self.store, self.base = store, base
        self.max_adapters, self.max_batch, self.batch_wait = max_adapters, max_batch, batch_wait
        self.trust_remote_code = trust_remote_code
        # The base as the first adapter of it was trained on (a QLoRA adapter's base in 4 bits), that adapter on it
        first = next(iter(sorted(self.servable())), None)
        names = [first] if first else []
        self.loaded = loader.load(
            store, names, base=None if first else base, verb="serve", trust_remote_code=trust_remote_code
        )
        self.tokenizer = self.loaded.tokenizer  # its chat template: the first adapter's, if it has one
        self.base_template = self.tokenizer.chat_template
        if first:
            from lorakit.models.reference import resolve
            from lorakit.models.tokenizer import load_tokenizer

            section = self.loaded.meta.recipe.base_model
            self.base_template = load_tokenizer(
                resolve(section.name, section.revision), trust_remote_code
            ).chat_template
        self.model = self.loaded.model
        self.resident: OrderedDict[str, None] = OrderedDict((n, None) for n in names)  # least recently used first
        self.queue: queue.Queue[Request] = queue.Queue()
        self.lock = threading.Lock()
        eos = self.model.generation_config.eos_token_id
        self.eos = {self.tokenizer.eos_token_id} | set(eos if isinstance(eos, list) else [eos])
        self.eos.discard(None)
        self.context = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        self.worker = threading.Thread(target=self._run, name="lorakit-engine", daemon=True)
        self.worker.start()

    # --- the store ---------------------------------------------------------------------------------

    def servable(self) -> dict[str, str]:
        """Adapters of the store trained on this base: name -> the base it records (read again on every call)."""
        out = {}
        for row in adapters.list_adapters(self.store):
            if row.get("error"):
                continue
            try:
                meta = adapters.load_meta(self.store, row["name"])
            except LorakitError:
                continue
            recorded = meta.recipe.base_model.name if meta.recipe.base_model else None
            if recorded in (self.base, None) or meta.base_model.reference == self.base:
                out[row["name"]] = recorded or self.base
        return out

    def ensure(self, name: str) -> None:
        """Load adapter `name` if it is not resident, unloading the least recently used beyond `max_adapters`."""
        from peft import PeftModel

        if name in self.resident:
            self.resident.move_to_end(name)
            return
        path = str(adapters.adapter_dir(self.store, name))
        with loader.peft_errors(name):
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(path, adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
        self.model.eval()
        self.resident[name] = None
        log.info("serve: loaded adapter %s", name)
        while len(self.resident) > self.max_adapters:  # after loading: peft keeps at least one adapter
            old, _ = self.resident.popitem(last=False)
            self.model.set_adapter(name)
            self.model.delete_adapter(old)
            log.info("serve: unloaded adapter %s (least recently used)", old)

    def chat_template(self, adapter: str | None) -> str | None:
        """The adapter's chat template (as it was trained), else the base tokenizer's."""
        if adapter:
            meta = adapters.load_meta(self.store, adapter)
            if meta.tokenizer.chat_template:
                return meta.tokenizer.chat_template
        return self.base_template

    def check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens == 0:
            raise LorakitError("the prompt is empty")
        if self.context and prompt_tokens + max_tokens > self.context:
            raise LorakitError(
                f"the prompt ({prompt_tokens} tokens) and max_tokens {max_tokens} exceed the model's context of "
                f"{self.context} tokens"
            )

    # --- the loop ------------------------------------------------------------------------------------

    def submit(self, req: Request) -> None:
        self.queue.put(req)

    def _run(self) -> None:
        while True:
            first = self.queue.get()
            batch = [first]
            deadline = time.monotonic() + self.batch_wait
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            groups: dict[tuple, list[Request]] = {}
            for req in batch:
                groups.setdefault(req.sampling, []).append(req)
            for reqs in (part for g in groups.values() for part in self._fit_resident(g)):
                try:
                    self._generate(reqs)
                except Exception as e:  # noqa: BLE001  (a failed batch answers its requests; the server stays up)
                    log.exception("serve: generation failed")
                    for req in reqs:
                        if req.finished is None:
                            req.finished = "error"
                            req.events("error", f"generation failed: {type(e).__name__}: {e}")

    def _fit_resident(self, reqs: list[Request]) -> list[list[Request]]:
        """The requests in batches of at most `max_adapters` different adapters (all resident at once)."""
        parts: list[list[Request]] = []
        names: set[str] = set()
        for r in reqs:
            if not parts or (r.adapter and r.adapter not in names and len(names) >= self.max_adapters):
                parts.append([])
                names = set()
            parts[-1].append(r)
            if r.adapter:
                names.add(r.adapter)
        return parts

    def _generate(self, reqs: list[Request]) -> None:
        with self.lock:
            for name in dict.fromkeys(r.adapter for r in reqs if r.adapter):
                self.ensure(name)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos)
            width = max(len(r.prompt_ids) for r in reqs)
            ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in reqs])
            mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in reqs])
            device = self.loaded.device
            kwargs: dict[str, Any] = {
                "max_new_tokens": max(r.max_tokens for r in reqs),
                "eos_token_id": sorted(self.eos),
                "pad_token_id": pad,
                "streamer": _Rows(self, reqs),
            }
            first = reqs[0]
            if first.temperature > 0:
                kwargs.update(do_sample=True, temperature=first.temperature, top_p=first.top_p)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            if self.resident:
                kwargs["adapter_names"] = [r.adapter or BASE_ROW for r in reqs]
            if first.seed is not None:
                torch.manual_seed(first.seed)
            with torch.no_grad():
                self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)

    # --- per token -------------------------------------------------------------------------------------

    def step(self, req: Request, tok: int) -> None:
        if req.finished:
            return
        if tok in self.eos:
            self.finish(req, "stop")
            return
        req.ids.append(tok)
        req.completion_tokens += 1
        text = self.tokenizer.decode(req.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a character split over tokens: wait for the rest
            return
        new = text[len(req.text) :]
        for s in req.stop:
            at = text.find(s, max(0, len(req.text) - len(s)))
            if at >= 0:
                new = text[len(req.text) : at]
                if new:
                    req.events("text", new)
                req.text = text[:at]
                self.finish(req, "stop")
                return
        req.text = text
        if new:
            req.events("text", new)
        if req.completion_tokens >= req.max_tokens:
            self.finish(req, "length")

    def finish(self, req: Request, reason: str) -> None:
        if req.finished is None:
            req.finished = reason
            req.events("done", reason)
