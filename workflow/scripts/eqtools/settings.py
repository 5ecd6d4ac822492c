"""Typed settings of each stage, built once from the validated config.

A rule passes its stage's settings as one param, `spec`: the canonical JSON of the object
(`param()`), so that equal settings give equal params and only a real change reruns the rule.
The script rebuilds the object with `from_param`. Each object holds exactly what changes the
stage's results; scheduling settings (mem_mb, runtime, threads, GPUs, partitions, batch rows,
the engine's path) never enter one.

Pure Python like eqtools.study: the Snakefile imports it.
"""

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field

from eqtools import study


def canon(obj) -> str:
    """Canonical JSON: equal values give equal text (Snakemake compares params by their repr)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _omit_none(default=None):
    """A field left out of the param when None (a model entry has `path` or `package`)."""
    return field(default=default, metadata={"omit_none": True})


def _build(kind, value):
    """`value` (parsed JSON) as an instance of the annotation `kind`."""
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        return kind.from_dict(value)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        for option in options:
            if dataclasses.is_dataclass(option) and isinstance(value, dict):
                return option.from_dict(value)
        return value
    if origin is list:
        (item,) = typing.get_args(kind)
        return [_build(item, v) for v in value]
    if origin is dict:
        _, item = typing.get_args(kind)
        return {k: _build(item, v) for k, v in value.items()}
    return value


class Settings:
    """Base of the typed settings: to and from the canonical param."""

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.metadata.get("omit_none"):
                continue
            out[f.name] = _plain(value)
        return out

    def param(self) -> str:
        return canon(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict):
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown setting(s) {', '.join(unknown)}")
        return cls(**{k: _build(hints[k], v) for k, v in data.items()})

    @classmethod
    def from_param(cls, text: str):
        return cls.from_dict(json.loads(text))

    @classmethod
    def coerce(cls, value):
        """`value` if it is already one, else built from its dict (callers and tests may pass
        either)."""
        return value if isinstance(value, cls) else cls.from_dict(value)


def _plain(value):
    if isinstance(value, Settings):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Relations(Settings):
    in_distribution: list[str]
    out_of_distribution: list[str]


@dataclass(frozen=True)
class Subsample(Settings):
    seed: int
    max_per_relation: dict[str, int | None]


@dataclass(frozen=True)
class Data(Settings):
    """prepare_splits: the relations, their templates and the subsampling."""

    relations: Relations
    templates: dict[str, str]
    subsample: Subsample


# ---------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelEntry(Settings):
    """A registry entry (config `models.<name>`) without its scheduling keys: where the weights
    are, `path` (directory or hub id) or `package`, and the dtype. What fetch_model stages; the
    rules after it never see the location (see `TrackedModel`)."""

    gguf_file: str | None
    dtype: str
    path: str | None = _omit_none()
    package: str | None = _omit_none()

    def tracked(self) -> "TrackedModel":
        return TrackedModel(self.dtype)


@dataclass(frozen=True)
class TrackedModel(Settings):
    """What of a model entry changes the results of the jobs that load the model, besides its
    weights (those are identified by their checksums, resources/models/{model}.identity.json,
    an input of the jobs): the dtype. Never where the weights lie, nor the device."""

    dtype: str


# ---------------------------------------------------------------------------------- SliCK


@dataclass(frozen=True)
class Exemplars(Settings):
    """select_exemplars."""

    n_exemplar_sets: int
    k_shot: int
    seed: int


@dataclass(frozen=True)
class Slick(Settings):
    n_exemplar_sets: int
    k_shot: int
    n_samples: int
    temperature: float
    top_k: int
    max_new_tokens: int
    seed: int
    full_p_correct: bool

    def exemplars(self) -> Exemplars:
        return Exemplars(self.n_exemplar_sets, self.k_shot, self.seed)


@dataclass(frozen=True)
class Labelling(Settings):
    """label_questions: everything that changes a label."""

    slick: Slick
    model: TrackedModel


@dataclass(frozen=True)
class Summary(Settings):
    """summarize_labels and the category-distribution table: the labelled splits, in order."""

    splits: list[str]


@dataclass(frozen=True)
class PtrueOptions(Settings):
    proposals: str


@dataclass(frozen=True)
class Ptrue(Settings):
    """ptrue: everything that changes a P(True) score."""

    ptrue: PtrueOptions
    model: TrackedModel


# ---------------------------------------------------------------------------------- mixtures


@dataclass(frozen=True)
class Mixtures(Settings):
    """build_mixture (the mixture itself is the {mixture} wildcard)."""

    per_relation_size: int | None
    relations: list[str] | None
    seed: int


# ---------------------------------------------------------------------------------- fine-tuning


@dataclass(frozen=True)
class Lora(Settings):
    rank: int
    alpha: float
    target_modules: str | list[str]


@dataclass(frozen=True)
class Recipe(Settings):
    """A fine-tuning recipe (config `recipes.<name>`) without its scheduling keys."""

    method: str
    learning_rate: float
    batch_size: int
    dropout: float
    epochs: int
    seed: int
    warmup_steps: int
    weight_decay: float
    dtype: str
    eval_dtype: str
    max_new_tokens: int
    lora: Lora
    # left out of the param when null (the recipe's dtype), as before the key existed
    checkpoint_dtype: str | None = _omit_none()

    @property
    def written_dtype(self) -> str:
        """The dtype of the checkpoints' weights: `checkpoint_dtype`, else the recipe's `dtype`
        (a mixed-precision recipe writes bf16, half the disk)."""
        return self.checkpoint_dtype or self.dtype


# keys of a model entry that only schedule its jobs (config `models.<name>`): never tracked
MODEL_SCHEDULING = ("gpus", "multi_gpu", "mem_mb", "rank_mem_mb", "device")


# keys of a recipe that only schedule the job (config `recipes.<name>`): never tracked. The
# micro-batch and the process count change only the floating-point summation order (and the
# dropout masks): the loss is normalised by the answer tokens of the whole batch.
RECIPE_SCHEDULING = ("mem_mb", "runtime", "micro_batch_size", "distributed")


@dataclass(frozen=True)
class Schedule(Settings):
    """How a recipe's fine-tune is spread over processes (config `recipes.<name>`:
    `micro_batch_size` and `distributed`); never tracked."""

    micro_batch_size: int = 16
    strategy: str = "none"
    nproc_per_node: int = 1
    nodes: int = 1
    activation_checkpointing: bool = False

    @classmethod
    def from_recipe(cls, recipe: dict) -> "Schedule":
        return cls(micro_batch_size=recipe["micro_batch_size"], **recipe["distributed"])

    @property
    def world(self) -> int:
        return self.nproc_per_node * self.nodes


@dataclass(frozen=True)
class Finetune(Settings):
    """finetune: the recipe with the run's seed, and when the test sets are evaluated."""

    recipe: Recipe
    eval_every: dict[str, int]
    device: str


# ---------------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class Table(Settings):
    """A table rule: which table, its mixtures (or splits), and Table 2's test settings."""

    table: str
    mixtures: list[str] | None = _omit_none()
    split: str | None = _omit_none()
    splits: list[str] | None = _omit_none()
    n_chunks: int | None = _omit_none()
    seed: int | None = _omit_none()


# ---------------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class Figure(Settings):
    """A figure rule: which figure, its title and the mixtures (or models) it draws."""

    figure: str
    title: str
    mixture: str | None = _omit_none()
    mixtures: list[str] | None = _omit_none()
    epochs: list[int] | None = _omit_none()
    unknown: list[str] | None = _omit_none()
    known_only: list[str] | None = _omit_none()
    stop: str | None = _omit_none()
    models: list[str] | None = _omit_none()


# ---------------------------------------------------------------------------------- the study


@dataclass(frozen=True)
class Study:
    """Every stage's settings, from one validated config (see `from_config`)."""

    data: Data
    models: dict[str, ModelEntry]
    model_gpus: dict[str, int]
    slick: Slick
    mixtures: Mixtures
    mixture_names: list[str]
    recipes: dict[str, Recipe]
    schedules: dict[str, Schedule]
    finetune_recipes: list[str]
    seeds: list[int]
    eval_every: dict[str, int]
    device: str
    ptrue: PtrueOptions
    figure_epochs: list[int]
    ptrue_run: dict[str, str]
    table_chunks: int
    table_seed: int

    @classmethod
    def from_config(cls, config: dict) -> "Study":
        """The settings of a config that eqtools.config.validate_config has checked and
        completed with its defaults."""
        mix = config["mixtures"]
        recipes = {
            name: Recipe.from_dict({k: v for k, v in r.items() if k not in RECIPE_SCHEDULING})
            for name, r in config["recipes"].items()
        }
        return cls(
            data=Data.from_dict({k: config[k] for k in ("relations", "templates", "subsample")}),
            models={
                name: ModelEntry.from_dict(
                    {k: v for k, v in m.items() if k not in MODEL_SCHEDULING}
                )
                for name, m in config["models"].items()
            },
            model_gpus={name: m["gpus"] for name, m in config["models"].items()},
            slick=Slick.from_dict(config["slick"]),
            mixtures=Mixtures.from_dict(
                {k: mix[k] for k in ("per_relation_size", "relations", "seed")}
            ),
            mixture_names=list(mix["names"]),
            recipes=recipes,
            schedules={name: Schedule.from_recipe(r) for name, r in config["recipes"].items()},
            finetune_recipes=list(config["finetune"]["recipes"]),
            seeds=list(config["finetune"]["seeds"]),
            eval_every=dict(config["finetune"]["eval_every"]),
            device=config["finetune"]["device"],
            ptrue=PtrueOptions.from_dict(config["ptrue"]),
            figure_epochs=list(config["figures"]["epochs"]),
            ptrue_run=dict(config["figures"]["ptrue_run"]),
            table_chunks=config["tables"]["n_chunks"],
            table_seed=config["tables"]["seed"],
        )

    # -- per stage

    def labelling(self, model: str) -> Labelling:
        return Labelling(self.slick, self.models[model].tracked())

    def ptrue_scoring(self, model: str) -> Ptrue:
        return Ptrue(self.ptrue, self.models[model].tracked())

    def run_seed(self, recipe: str, suffix: str) -> int:
        """The training seed of a run: the recipe's own `seed` at `{recipe}/`, N at
        `{recipe}-seed{N}/` (finetune.seeds)."""
        return int(suffix.removeprefix("-seed")) if suffix else self.recipes[recipe].seed

    def seed_suffixes(self) -> list[str]:
        return [study.seed_suffix(None)] + [study.seed_suffix(n) for n in self.seeds]

    def finetuning(self, recipe: str, suffix: str) -> Finetune:
        seeded = dataclasses.replace(self.recipes[recipe], seed=self.run_seed(recipe, suffix))
        return Finetune(seeded, self.eval_every, self.device)

    def table(self, table: str, split: str | None = None) -> Table:
        names = self.mixture_names
        if table == "table2":
            return Table(
                table,
                mixtures=study.table2_mixtures(names),
                split=split,
                n_chunks=self.table_chunks,
                seed=self.table_seed,
            )
        if table == "table1":
            return Table(table, mixtures=study.table1_mixtures(names))
        if table == "table8":
            return Table(table, mixtures=study.table8_mixtures(names))
        if table == "category_distribution":
            return Table(table, splits=list(study.LABELLED_SPLITS))
        raise ValueError(f"unknown table {table!r}")

    def figure(self, figure: str, title: str, models: list[str] | None = None) -> Figure:
        names = self.mixture_names
        if figure == "fig1":
            return Figure(figure, title, mixture=study.fig1_mixture(names))
        if figure == "fig3a":
            mixtures = study.fig3a_mixtures(names)
            return Figure(figure, title, mixtures=mixtures, epochs=self.figure_epochs)
        if figure == "fig3b":
            return Figure(figure, title, **study.fig3b_mixtures(names))
        if figure == "fig4":
            return Figure(figure, title, mixtures=study.fig4_mixtures(names))
        if figure == "fig5":
            return Figure(figure, title, **self.ptrue_run)
        if figure == "comparison":
            return Figure(figure, title, models=models, mixtures=study.fig3a_mixtures(names))
        raise ValueError(f"unknown figure {figure!r}")
