"""Everything a run settles before it reads weights: the checks on the user's input, the prepared data and the
Plan. `lorakit train --dry-run` stops here, so this module imports neither the trainer nor peft."""

from __future__ import annotations

from pathlib import Path

from lorakit.data.prepare import Prepared, prepare
from lorakit.errors import LorakitError
from lorakit.models.architecture import check_quantizable, choose_targets, skeleton
from lorakit.models.reference import describe, resolve
from lorakit.models.tokenizer import load_tokenizer
from lorakit.plan import Machine, Plan, plan_training, probe
from lorakit.recipe import Recipe
from lorakit.store import adapters


def preflight(recipe: Recipe, overwrite: bool):
    """Everything that can fail on the user's input, checked before model weights are read."""
    from lorakit.recipe import RecipeError
    from lorakit.recipe.load import tracker_problems

    missing = tracker_problems(recipe)
    if missing:
        raise RecipeError("recipe", missing)
    store = Path(recipe.output.store)
    if adapters.exists(store, recipe.adapter_name) and not overwrite:
        raise LorakitError(
            f"adapter {recipe.adapter_name!r} already exists in {store.resolve()}; "
            "use --overwrite to replace it or set output.name"
        )
    ref = resolve(recipe.base_model.name, recipe.base_model.revision)
    meta_model = skeleton(ref, recipe.base_model.trust_remote_code)
    check_quantizable(meta_model, recipe.base_model)
    targets, fan_in_fan_out = choose_targets(meta_model, recipe.lora.target_modules)
    tokenizer = load_tokenizer(ref, recipe.base_model.trust_remote_code)
    data = prepare(recipe.data, tokenizer, recipe.train.seed)
    return ref, meta_model.config, targets, fan_in_fan_out, tokenizer, data


def packed_rows(data: Prepared, recipe: Recipe) -> int:
    """Training rows once packed, as the trainer will pack them (TRL's own best-fit-decreasing packing)."""
    train_ds, _ = data.datasets()
    if not recipe.data.packing:
        return len(train_ds)
    from trl.data_utils import pack_dataset

    return len(pack_dataset(train_ds.select_columns(["input_ids"]), recipe.data.block_size, "bfd"))


def eval_description(recipe: Recipe, data: Prepared) -> str:
    split = recipe.data.eval_split
    if not len(data.eval_set):
        return "none"
    where = f"the file {Path(split).name}" if isinstance(split, str) else f"{split:.0%} of the documents held out"
    return f"{len(data.eval_set)} examples, {data.eval_set.n_tokens():,} tokens ({where})"


def resolve_plan(
    recipe: Recipe, config, targets, fan_in_fan_out: bool, data: Prepared, machine: Machine | None = None
) -> Plan:
    """The run's Plan, from the recipe, the model's config (its width), this machine and the prepared data (for the
    step count)."""
    machine = machine or probe()
    rows = packed_rows(data, recipe)
    return plan_training(
        recipe, machine, targets, fan_in_fan_out, rows, eval_description(recipe, data), hidden_size(config)
    )


def hidden_size(config) -> int | None:
    """The model's width: its text model's hidden size (GPT-2's n_embd is mapped to it by its config class)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text, "hidden_size", None)
    return size if isinstance(size, int) and size > 0 else None


def dry_run(recipe: Recipe, say=print) -> Plan:
    """`lorakit train --dry-run`: the resolved Plan, printed; reads the data and the model's config, no weights."""
    ref, config, targets, fan_in_fan_out, tokenizer, data = preflight(recipe, overwrite=True)
    plan = resolve_plan(recipe, config, targets, fan_in_fan_out, data)
    say(f"base model: {recipe.base_model.name} ({describe(ref)}, {config.model_type})")
    say(data_summary(data))
    for line in plan.summary():
        say(line)
    return plan


def data_summary(data: Prepared) -> str:
    r = data.report
    parts = [
        f"{Path(s['path']).name} ({s['format']}, {s['documents']} docs, {s['share']:.0%} of training tokens)"
        for s in r["sources"]
    ]
    return (
        f"data: {data.origin()}; {r['train_tokens']:,} training tokens in {r['train_examples']} examples, "
        f"{r['eval_tokens']:,} eval tokens; mix: " + ", ".join(parts)
    )
