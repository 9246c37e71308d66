"""`lorakit serve --engine builtin`, driven by the official `openai` client against a live server: every adapter of
the store behind one endpoint, each request's greedy output equal to lorakit's offline generation with that
adapter, batched requests equal to single ones, streaming equal to whole answers, an adapter trained while the
server runs served without a restart, the least recently used adapter unloaded, the API key enforced, and bad
requests answered with OpenAI-style errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from conftest import trained

PROMPTS = ["The tide at Harrow Point", "Fog came in", "Spring tides"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store(tiny_llama, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    trained(tiny_llama, root, "tides")
    trained(tiny_llama, root, "other", train={"seed": 7, "learning_rate": 5e-2})
    return root / "adapters"


def start(store: Path, *args: str):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorakit.cli", "serve", "--store", str(store), "--port", str(port), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read())
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
            return proc, f"http://127.0.0.1:{port}/v1"
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError("the server did not start in 180 s")


@pytest.fixture(scope="module")
def server(store):
    proc, url = start(store, "--max-adapters", "1", "--batch-wait-ms", "200")
    yield proc, url
    proc.terminate()
    proc.wait(timeout=30)


def offline(store: Path, adapter: str | None, base: str, prompt: str, n: int = 12) -> str:
    from lorakit.store.loader import load
    from lorakit.use.generate import generate

    loaded = load(store, [adapter] if adapter else [], base=None if adapter else base)
    return generate(loaded, prompt, style="raw", max_new_tokens=n, temperature=0)


def test_models_and_greedy_parity_with_offline_generation(server, store, tiny_llama):
    _, url = server
    client = openai.OpenAI(base_url=url, api_key="unused")
    ids = [m.id for m in client.models.list().data]
    assert ids == [str(tiny_llama), "other", "tides"]
    got = {}
    for model in ("tides", "other", str(tiny_llama), "tides"):  # max 1 resident: every switch unloads and loads
        r = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=12, temperature=0)
        assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
        got.setdefault(model, r.choices[0].text)
        assert got[model] == r.choices[0].text
    for model in ("tides", "other"):
        assert got[model] == offline(store, model, str(tiny_llama), PROMPTS[0])
    assert got[str(tiny_llama)] == offline(store, None, str(tiny_llama), PROMPTS[0])
    assert len({got["tides"], got["other"], got[str(tiny_llama)]}) == 3  # each adapter changes the output


def test_concurrent_requests_batch_and_match_single_ones(server, tiny_llama):
    _, url = server
    client = openai.OpenAI(base_url=url, api_key="unused")
    jobs = [(m, p) for p in PROMPTS for m in ("tides", "other", str(tiny_llama))]

    def ask(job):
        model, prompt = job
        return client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0).choices[0].text

    single = [ask(j) for j in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:  # within the 200 ms batch window: mixed-adapter batches
        together = list(pool.map(ask, jobs))
    assert together == single


def test_streaming_chat_equals_the_whole_answer(server):
    _, url = server
    client = openai.OpenAI(base_url=url, api_key="unused")
    messages = [{"role": "user", "content": "When does the tide turn?"}]
    whole = client.chat.completions.create(model="tides", messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="tides", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_bad_requests_get_openai_errors(server):
    _, url = server
    client = openai.OpenAI(base_url=url, api_key="unused")
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="x", max_tokens=3)
    with pytest.raises(openai.BadRequestError, match="exceed the model's context"):
        client.completions.create(model="tides", prompt="tide " * 600, max_tokens=3)
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="tides", prompt="x", max_tokens=-1)


def test_new_adapters_are_served_without_restart_and_the_key_is_required(store, tiny_llama):
    proc, url = start(store, "--api-key", "s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong").models.list()
        client = openai.OpenAI(base_url=url, api_key="s3cret")
        assert "late" not in [m.id for m in client.models.list().data]
        trained(tiny_llama, store.parent, "late", train={"seed": 3, "learning_rate": 5e-2})
        assert "late" in [m.id for m in client.models.list().data]
        r = client.completions.create(model="late", prompt=PROMPTS[1], max_tokens=6, temperature=0)
        assert r.choices[0].text == offline(store, "late", str(tiny_llama), PROMPTS[1], 6)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_refuses_bad_options(store, tmp_path):
    from conftest import run_cli

    res = run_cli("serve", "--store", str(store), "--engine", "magic", cwd=tmp_path)
    assert res.returncode == 2 and "--engine must be auto or builtin" in res.stderr
    empty = run_cli("serve", "--store", str(tmp_path / "none"), cwd=tmp_path)
    assert empty.returncode == 2 and "--base" in empty.stderr and "Traceback" not in empty.stderr
