"""The recipe: a typed, validated description of one fine-tuning run (schema, loading, reference docs)."""

from lorakit.recipe.load import RecipeError, load_recipe, parse_override, read_yaml, resolve_path, validate_recipe
from lorakit.recipe.schema import (
    EMBEDDED_DEFAULT,
    BaseModelSection,
    DataSection,
    DataSource,
    LoraSection,
    OutputSection,
    Recipe,
    TrainSection,
    check_name,
)

__all__ = [
    "EMBEDDED_DEFAULT",
    "BaseModelSection",
    "DataSection",
    "DataSource",
    "LoraSection",
    "OutputSection",
    "Recipe",
    "RecipeError",
    "TrainSection",
    "check_name",
    "load_recipe",
    "parse_override",
    "read_yaml",
    "resolve_path",
    "validate_recipe",
]
