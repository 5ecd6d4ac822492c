"""Validation of the workflow config against its JSON schema, with messages that name the key."""

import os
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
    _parse_command_line_strings(config, validator)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.path)))
    problems = [_describe(e) for e in errors]
    if not problems:
        problems = _semantic_problems(config)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return config


def _parse_command_line_strings(config: dict, validator) -> None:
    """Snakemake hands the nested values of `--config key={...}` over as strings (it reads them
    with YAML's BaseLoader): "1", "true", "null". Where the schema rejects such a string and the
    value read as YAML is what it asks for, use that value, so that an override from the command
    line works as it does in a config file. A string the schema accepts stays a string."""

    def failures(errors):
        for error in errors:
            yield error
            yield from failures(error.context or ())

    for _ in range(1000):  # each round fixes what the last one uncovered (nested defaults)
        fixes = []
        for error in failures(validator.iter_errors(config)):
            if error.validator not in ("type", "enum", "const") or not isinstance(
                error.instance, str
            ):
                continue
            value = _read_scalar(error.instance)
            if not isinstance(value, str) and validator.evolve(schema=error.schema).is_valid(value):
                fixes.append((list(error.absolute_path), value))
        if not fixes:
            return
        for path, value in fixes:
            parent = config
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = value


def _read_scalar(text: str):
    """`text` as YAML reads it, or as a number ("1e-4", which YAML 1.1 leaves a string)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        for number in (int, float):
            try:
                return number(text)
            except ValueError:
                pass
    return value


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
    if (state_dir := finetune.get("state_dir")) is not None and (
        reason := _unwritable(Path(state_dir).expanduser())
    ):
        problems.append(f"config key 'finetune.state_dir': {state_dir!r} {reason}")
    return problems


def _unwritable(folder: Path) -> str | None:
    """Why the directory `folder` cannot be created or written to, or None. The check creates
    nothing: it looks at the nearest existing parent."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"is not a directory ({existing} is a file)"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot be written ({existing} is not writable)"
    return None
