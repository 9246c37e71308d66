"""lorakit: recipe-driven LoRA/QLoRA fine-tuning for causal language models.

The Python API, for notebooks and scripts; each function does what its `lorakit` verb does:

    import lorakit
    result = lorakit.train("recipes/quickstart.yaml", overrides=["train.max_steps=10"], overwrite=True)
    model, tokenizer = lorakit.load("quickstart")            # base + adapter, placed as the Plan says
    print(lorakit.generate("quickstart", "Day 3. Wind:", temperature=0))
    lorakit.merge("quickstart", "merged/quickstart")         # a verified plain transformers folder

Imports stay light: torch and transformers load on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorakit.deploy.merge import MergeReport
    from lorakit.plan import Plan
    from lorakit.recipe import Recipe
    from lorakit.training.run import TrainResult

__version__ = "0.1.0"
__all__ = ["dry_run", "generate", "load", "merge", "train"]


def _recipe(recipe: str | Path | Recipe, overrides: list[str] | None) -> Recipe:
    from lorakit.recipe import Recipe, load_recipe

    if isinstance(recipe, Recipe):
        if overrides:
            raise ValueError("overrides apply to a recipe file; change the Recipe object instead")
        return recipe
    return load_recipe(recipe, overrides or [])


def dry_run(recipe: str | Path | Recipe, overrides: list[str] | None = None) -> Plan:
    """The resolved Plan of a recipe on this machine (`lorakit train --dry-run`): reads data and config, no weights."""
    from lorakit.training.preflight import dry_run as resolve

    return resolve(_recipe(recipe, overrides), say=lambda _: None)


def train(
    recipe: str | Path | Recipe, overrides: list[str] | None = None, *, overwrite: bool = False, resume: bool = False
) -> TrainResult:
    """Train a recipe (a YAML file, or a `lorakit.recipe.Recipe`) and write its adapter to the store.

    Returns the adapter's name, folder, metrics and metadata (`lorakit.json`)."""
    from lorakit.training.run import train as run

    return run(_recipe(recipe, overrides), overwrite=overwrite, resume=resume, say=lambda _: None)


def load(
    adapter: str | list[str] | None,
    base: str | None = None,
    store: str | Path = "adapters",
    *,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """(model, tokenizer): the base with the adapter(s) attached (a peft `PeftModel`), or the base alone for None.

    Code from the base model's repository runs only with `trust_remote_code=True`, whatever an adapter records."""
    from lorakit.store.loader import load as load_adapters

    loaded = load_adapters(store, adapter, base, trust_remote_code=trust_remote_code)
    return loaded.model, loaded.tokenizer


def generate(
    adapter: str | None,
    prompt: str,
    *,
    base: str | None = None,
    store: str | Path = "adapters",
    max_new_tokens: int = 128,
    temperature: float = 0.7,
    seed: int = 0,
    trust_remote_code: bool = False,
) -> str:
    """A continuation of `prompt` by the adapter (None: the base model), wrapped as the adapter was trained."""
    from lorakit.store.loader import load as load_adapters
    from lorakit.use.generate import generate as run

    loaded = load_adapters(store, adapter, base, trust_remote_code=trust_remote_code)
    return run(loaded, prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)


def merge(
    adapter: str,
    out: str | Path,
    *,
    store: str | Path = "adapters",
    dtype: str = "float32",
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> MergeReport:
    """Merge the adapter into its base and write a plain transformers folder, verified against base + adapter."""
    from lorakit.deploy.merge import merge_adapter

    return merge_adapter(
        store, adapter, Path(out), dtype=dtype, overwrite=overwrite, say=lambda _: None,
        trust_remote_code=trust_remote_code,
    )  # fmt: skip
