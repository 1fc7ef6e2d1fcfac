"""Typed experiment configuration (OmegaConf structured configs).

A config file is plain YAML. It is merged onto the dataclass schema below, so an unknown key or a value of the
wrong type fails at load time with the key's full path (``training.lr``), before any data or model is touched.
The ``strategy`` node is typed by the chosen strategy's own config dataclass, which the caller looks up (the run
recipe asks ``strategies.registry``; this module imports nothing above it), so a strategy's options are checked as
strictly as the rest. Configs never execute code: the only interpolation
resolvers are OmegaConf's built-ins (``${oc.env:VAR,default}``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config value or key is invalid; the message names the full key path."""


@dataclass
class StreamConfig:
    # Named stream ("standard", "long", see `continual list`) or "custom" to use `tasks` alone.
    name: str = "standard"
    # Order within the named stream (standard: 1-3, long: 4-6). Ignored for "custom".
    order: Optional[int] = None
    # Explicit task list; overrides the named stream's order when non-empty. Entries are task folder names
    # ("agnews"), group/task paths ("TC/agnews") or Hugging Face datasets ("hf:ag_news", "hf:glue/sst2").
    tasks: List[str] = field(default_factory=list)
    # Root of a CL_Benchmark-layout folder; empty means the CONTINUAL_DATA environment variable.
    data_root: Optional[str] = None
    # Training cap per class and test cap per task (None = everything); sampled with `seed`.
    train_per_class: Optional[int] = None
    test_per_task: Optional[int] = None
    # Split used for evaluation: "test", "dev", or "heldout": rows of the training file that were not drawn for
    # training (stratified, test_per_task of them; needs train_per_class), for searches that must leave dev and test
    # unseen. In the CL_Benchmark copies dev.json is test.json, so "dev" scores there are test scores.
    eval_split: str = "test"
    # Rows whose label is not in labels.json fail loading unless this is true (then they are skipped and reported).
    skip_unknown_labels: bool = False
    # Tokenizer truncation length.
    max_length: int = 128
    # Where tokenized datasets are cached (empty: $CONTINUAL_CACHE or ~/.cache/continual).
    cache_dir: Optional[str] = None
    seed: int = 0


@dataclass
class BackboneConfig:
    # Short name ("minilm"), local folder, or Hugging Face Hub id (needs network or a filled HF cache).
    name: str = "minilm"
    # Build the architecture from its config with random weights (tests, from-scratch baselines).
    random_init: bool = False
    # Overrides applied to the backbone's config, e.g. {num_hidden_layers: 2, hidden_size: 32}.
    config_overrides: Dict[str, Any] = field(default_factory=dict)
    # "task": one classification head per task (task-incremental, task id used at test time);
    # "shared": one head over the union of all labels seen so far (task-agnostic);
    # "label_words": no head: a causal LM scores each candidate label's words after the prompt (its frozen LM head).
    head: str = "task"
    # label_words only. Which labels compete at test time: "task" (the sample's task's labels: task id given) or
    # "seen" (every label of the tasks trained so far: task id not given, as the O-LoRA family reports). Training
    # always scores the current task's labels.
    label_space: str = "task"
    # label_words only. The training loss: "candidates" (cross-entropy over the current task's label scores: only its
    # labels compete), "lm" (the language-modelling loss of the gold label's words over the whole vocabulary, as the
    # O-LoRA family trains: every other continuation is pushed down, other tasks' labels included), or "auto" ("lm"
    # with label_space=seen, where other tasks' labels compete at test time; "candidates" with label_space=task).
    label_loss: str = "auto"
    # label_words only: the prompt around each input; "{text}" (exactly once) stands for the input's tokens.
    template: str = "{text}\nAnswer:"
    # label_words only: per-task templates {task name: template}, overriding `template` for that task. A task's
    # template comes with its inputs (like O-LoRA's instructions), so it reveals the task to the model.
    task_templates: Dict[str, str] = field(default_factory=dict)
    # label_words only: {task name: {label: words}}; a label not named is scored by its own string.
    label_words: Dict[str, Dict[str, str]] = field(default_factory=dict)
    # Sentence representation fed to the head: "mean" over tokens, "cls" (first token) or "last" (last non-pad).
    pooling: str = "mean"
    # Allow custom modelling code from the Hub (off unless you ask for it).
    trust_remote_code: bool = False


@dataclass
class StrategyConfig:
    """Base of every strategy's config; each strategy subclasses it with its own options."""

    # Registered strategy name (see `continual list`).
    name: str = "full_finetune"


@dataclass
class RouterConfig:
    """Base of every router's config. ``oracle``: each sample uses the modules of the task id it comes with (at test
    time too); another name infers the task from the input (``continual list`` shows the registered routers)."""

    name: str = "oracle"


@dataclass
class TrainingConfig:
    epochs: int = 1
    batch_size: int = 16
    eval_batch_size: int = 64
    lr: float = 5e-5
    weight_decay: float = 0.0
    # "adamw" or "sgd".
    optimizer: str = "adamw"
    # Gradient-norm clip (0 disables).
    max_grad_norm: float = 1.0
    # "cpu", "cuda", "cuda:0", or "auto" (cuda when available).
    device: str = "auto"
    # Evaluate the untrained model first (needed for FWT).
    eval_before_training: bool = True
    # Which tasks are evaluated after each task: "all" (the whole accuracy matrix) or "seen" (the tasks trained so
    # far and the next one: all that ACC, BWT, FWT and forgetting read; later tasks' cells stay empty). "seen" makes
    # evaluation grow with the tasks trained, not with the stream: about half the cost on a long stream.
    eval_tasks: str = "all"
    # Arithmetic of every forward of the model (training, evaluation, router fitting, predict): "fp32", "bf16"
    # (torch.autocast: matmuls in bfloat16, weights, gradients, optimizer state and outputs in float32), or "auto"
    # (bf16 where the device runs it natively: GPUs that support it, CPUs with AMX or AVX512-BF16; else fp32).
    # Results differ slightly from fp32.
    precision: str = "fp32"
    # Directory for per-task safetensors checkpoints (empty: no checkpoints).
    checkpoint_dir: Optional[str] = None
    progress: bool = True


@dataclass
class TrackingConfig:
    # False disables MLflow entirely.
    enabled: bool = True
    # Tracking URI; empty means $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory.
    uri: Optional[str] = None
    # Empty: derived from the stream ("standard-order1").
    experiment: Optional[str] = None
    # Empty: derived from strategy, backbone and seed.
    run_name: Optional[str] = None
    # Local folder for the run's artifacts (plots, CSV, summary) besides MLflow.
    output_dir: str = "outputs"
    # MLflow run id of a parent run (set by `continual compare` for its cells, which appear nested under it).
    parent_run_id: Optional[str] = None


@dataclass
class ExperimentConfig:
    stream: StreamConfig = field(default_factory=StreamConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 0


_CHOICES = {
    "backbone.head": ("task", "shared", "label_words"),
    "backbone.label_space": ("task", "seen"),
    "backbone.label_loss": ("auto", "lm", "candidates"),
    "backbone.pooling": ("mean", "cls", "last"),
    "training.optimizer": ("adamw", "sgd"),
    "stream.eval_split": ("test", "dev", "heldout"),
    "training.eval_tasks": ("all", "seen"),
    "training.precision": ("fp32", "bf16", "auto"),
}


def check_folder_name(key: str, value: Optional[str], under: str = "tracking.output_dir") -> None:
    """``value`` (when set) becomes one folder under the folder ``under`` names, so it must be a single folder name.

    Raises:
        ConfigError: ``value`` holds a path separator (``/`` or a backslash) or is ``.`` or ``..``, naming ``key``.
    """
    if not value:
        return
    if "/" in value or "\\" in value or "\0" in value or value in (".", ".."):
        nested = " (MLflow experiment names may nest with '/', but this one is also a folder name)" if key.endswith(
            "experiment") else ""
        raise ConfigError(
            f"{key}: {value!r} is used as a folder name under {under}, so it must be a single name: no '/' or "
            f"backslash, and not '.' or '..'{nested}; use e.g. {_folder_safe(value)!r}"
        )


def _folder_safe(value: str) -> str:
    safe = "-".join(part for part in value.replace("\\", "/").split("/") if part not in ("", ".", ".."))
    return safe.replace("\0", "") or "run"


def check_tracking_names(tracking: DictConfig) -> None:
    """``tracking.experiment`` and ``tracking.run_name`` name folders (see :func:`check_folder_name`)."""
    for key in ("experiment", "run_name"):
        check_folder_name(f"tracking.{key}", tracking.get(key))


def _wrap(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None)
    msg = (getattr(err, "msg", None) or str(err)).splitlines()[0]
    return ConfigError(f"{key}: {msg} (from {source})" if key else f"{source}: {msg}")


def read_layers(
    path: str | Path | None, overrides: Sequence[str] = (), extra: Dict[str, Any] | None = None
) -> List[Tuple[str, DictConfig]]:
    """The config layers in merge order, each with its source for error messages: the YAML file, ``extra`` (a plain
    dict) and the ``key=value`` overrides.

    Raises:
        ConfigError: a missing file, invalid YAML or a malformed override.
    """
    layers: List[Tuple[str, DictConfig]] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            layers.append((str(path), OmegaConf.load(path)))
        except Exception as err:  # YAML syntax errors
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if extra:
        layers.append(("<extra>", OmegaConf.create(extra)))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
        try:
            layers.append(("<command line>", OmegaConf.from_dotlist(list(overrides))))
        except OmegaConfBaseException as err:
            raise _wrap(err, "<command line>") from err
    return layers


def chosen_name(layers: Sequence[Tuple[str, DictConfig]], node: str, default: str) -> str:
    """The ``<node>.name`` the layers choose (the last layer that sets it wins), else ``default``.

    A node whose schema depends on its name (``strategy``, ``router``) is typed before the layers are merged.
    """
    name = default
    for _, layer in layers:
        value = layer.get(node) if isinstance(layer, DictConfig) else None
        if isinstance(value, DictConfig) and value.get("name") is not None:
            name = str(value.get("name"))
    return name


def merge_layers(schema: DictConfig, layers: Sequence[Tuple[str, DictConfig]]) -> DictConfig:
    """Merge ``layers`` onto a structured ``schema``; an unknown key or a wrong type names its full key and source."""
    cfg = schema
    for source, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as err:
            raise _wrap(err, source) from err
    return cfg


def load_experiment_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    extra: Dict[str, Any] | None = None,
    *,
    strategy_schema: Callable[[str], type],
    router_schema: Optional[Callable[[str], type]] = None,
) -> DictConfig:
    """Load a YAML preset, apply ``key=value`` overrides and validate against the schema.

    Args:
        path: YAML file (may be None for pure defaults).
        overrides: dotlist overrides, e.g. ``["training.lr=1e-4", "strategy.name=ewc"]``.
        extra: a plain dict merged after the file and before the overrides (used by tests and the Python API).
        strategy_schema: the config dataclass (a :class:`StrategyConfig`) of a strategy name; raises ``KeyError``
            with a message naming the known strategies for an unknown one.
        router_schema: the same for router names (a :class:`RouterConfig`); None allows only ``oracle``.

    Returns:
        A resolved, read-only ``DictConfig`` typed by :class:`ExperimentConfig`, whose ``strategy`` node is typed by
        the chosen strategy's config class.

    Raises:
        ConfigError: unknown key, wrong type, unknown strategy or out-of-range choice, naming the full key path.
    """
    layers = read_layers(path, overrides, extra)

    # The strategy name decides the schema of the `strategy` node, so find it first (last layer wins).
    name = chosen_name(layers, "strategy", StrategyConfig.name)
    try:
        strategy_cls = strategy_schema(name)
    except KeyError as err:
        raise ConfigError(f"strategy.name: {err.args[0]}") from err

    router = chosen_name(layers, "router", RouterConfig.name)
    router_cls = RouterConfig
    if router != RouterConfig.name:
        try:
            if router_schema is None:
                raise KeyError(f"unknown router {router!r}; registered: oracle")
            router_cls = router_schema(router)
        except KeyError as err:
            raise ConfigError(f"router.name: {err.args[0]}") from err

    schema = OmegaConf.structured(ExperimentConfig)
    schema.strategy = OmegaConf.structured(strategy_cls)
    schema.router = OmegaConf.structured(router_cls)
    cfg = merge_layers(schema, layers)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise _wrap(err, "interpolation") from err
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
    for key in ("training.epochs", "training.batch_size", "training.eval_batch_size", "stream.max_length"):
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"{key}: must be >= 1, got {OmegaConf.select(cfg, key)}")
    for key in ("stream.train_per_class", "stream.test_per_task"):
        value = OmegaConf.select(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"{key}: must be >= 1 or null, got {value}")
    if cfg.training.lr <= 0:
        raise ConfigError(f"training.lr: must be > 0, got {cfg.training.lr}")
    check_tracking_names(cfg.tracking)
    if cfg.backbone.head != "label_words":
        for key, default in (("label_space", "task"), ("label_loss", "auto"), ("template", BackboneConfig.template)):
            if cfg.backbone[key] != default:
                raise ConfigError(f"backbone.{key}: applies to backbone.head=label_words only (head is {cfg.backbone.head!r})")
        for key in ("task_templates", "label_words"):
            if cfg.backbone[key]:
                raise ConfigError(f"backbone.{key}: applies to backbone.head=label_words only (head is {cfg.backbone.head!r})")
    OmegaConf.set_readonly(cfg, True)
    return cfg


def flatten(cfg: DictConfig | dict, prefix: str = "") -> Dict[str, Any]:
    """Flatten a nested config into ``{"a.b.c": value}`` (lists become their string form)."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    out: Dict[str, Any] = {}
    for key, value in container.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, prefix=f"{full}."))
        else:
            out[full] = value
    return out


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
