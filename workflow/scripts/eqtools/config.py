"""Validation of the workflow config against its JSON schema, with messages that name the key."""

from pathlib import Path

import jsonschema
import yaml
from jsonschema import Draft202012Validator, validators


class ConfigError(ValueError):
    """The config is invalid; the message names every offending key."""


def _with_defaults(validator_class):
    """A validator that fills in `default:` values of the schema (jsonschema FAQ recipe)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema:
                    instance.setdefault(name, subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(validator_class, {"properties": set_defaults})


def _key(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _describe(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties":
        return (
            f"config key '{_key(error.path)}': {error.message} "
            "(not a known key; check the spelling)"
        )
    if error.validator == "oneOf" and error.path and error.path[0] == "models":
        return (
            f"config key '{_key(error.path)}': give exactly one of 'path' (a local directory "
            "or hub id) or 'package' (an installed package shipping the weights)"
        )
    expected = error.schema.get("description")
    hint = f" (expected: {expected})" if expected and error.validator in ("type", "enum") else ""
    return f"config key '{_key(error.path)}': {error.message}{hint}"


def load_schema(path: str | Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def validate_config(config: dict, schema: dict) -> dict:
    """Validate `config` in place, fill in defaults and check what the schema cannot express.

    Raises ConfigError listing every problem, each with the dotted key that causes it.
    """
    validator = _with_defaults(Draft202012Validator)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.path)))
    problems = [_describe(e) for e in errors]
    if not problems:
        problems = _semantic_problems(config)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return config


def _semantic_problems(config: dict) -> list[str]:
    problems = []
    templates = config["templates"]
    rels = config["relations"]
    for group in ("in_distribution", "out_of_distribution"):
        for rel in rels[group]:
            if rel not in templates:
                problems.append(
                    f"config key 'relations.{group}': relation {rel} has no entry in 'templates'"
                )
    both = sorted(set(rels["in_distribution"]) & set(rels["out_of_distribution"]))
    if both:
        problems.append(
            f"config key 'relations': {', '.join(both)} listed as both in-distribution and "
            "out-of-distribution"
        )
    recipes = config["recipes"]
    finetune = config.setdefault("finetune", {})
    finetune.setdefault("recipes", list(recipes))
    for name in finetune["recipes"]:
        if name not in recipes:
            problems.append(
                f"config key 'finetune.recipes': {name!r} is not a key of 'recipes' "
                f"({', '.join(recipes)})"
            )
    models = config["models"]
    config.setdefault("run_models", list(models))
    for name in config["run_models"]:
        if name not in models:
            problems.append(
                f"config key 'run_models': {name!r} is not a key of 'models' ({', '.join(models)})"
            )
    for name, recipe in recipes.items():
        parallel = recipe["distributed"]
        if parallel["strategy"] == "none" and parallel["nproc_per_node"] * parallel["nodes"] > 1:
            problems.append(
                f"config key 'recipes.{name}.distributed': {parallel['nproc_per_node']} "
                f"process(es) per node on {parallel['nodes']} node(s) need a strategy (ddp or "
                "fsdp), not none"
            )
    for rel in config["mixtures"]["relations"] or []:
        if rel not in rels["in_distribution"]:
            problems.append(
                f"config key 'mixtures.relations': {rel} is not an in-distribution relation"
            )
    return problems
