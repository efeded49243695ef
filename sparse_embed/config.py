"""The run configuration: a frozen dataclass tree, YAML loading and dotted overrides.

Defaults live only in the dataclasses below. A YAML file (packaged name or
path) overrides some of them, `--set key.path=value` overrides the result;
every key and value is checked against the dataclass fields, and an unknown
key is a `ConfigError` naming the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sparse_embed.errors import ConfigError
from sparse_embed.fileio import atomic_path
from sparse_embed.registry import Registry

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class DataConfig:
    """Training input.

    Attributes:
        train_files: Glob of training TFRecord shards, relative to `--data_dir`.
        label_map: Label-map file written by `build_tfrecords`, relative to `--data_dir`.
        shuffle_buffer: Records shuffled together (the `shuffle` sampler's window).
        augment: Augment training images with the `augmentation` policy.
        augmentation: `full` (flip, scale/crop, colour jitter) | `flip` (mirror
            only: the insightface recipe, and the cheaper pipeline).
        sampler: `shuffle` (every record once an epoch, window-shuffled) |
            `p_k` (class-balanced: `classes_per_batch` classes x
            `samples_per_class` images, the per-worker batch; for pair and proxy losses).
        classes_per_batch: P of the `p_k` sampler.
        samples_per_class: K of the `p_k` sampler.
        pairs: Verification pairs file (LFW format), relative to `--data_dir`.
        pairs_images: Image root the pairs file refers to, relative to `--data_dir`.
    """

    train_files: str = "tfrecords/train-*"
    label_map: str = "tfrecords/labels.txt"
    shuffle_buffer: int = 2048
    augment: bool = True
    augmentation: str = "full"
    sampler: str = "shuffle"
    classes_per_batch: int = 32
    samples_per_class: int = 4
    pairs: str = "pairs.txt"
    pairs_images: str = "test"


@dataclass(frozen=True)
class ModelConfig:
    """Backbone and embedding layer.

    Attributes:
        name: A name in `sparse_embed.models.MODELS`.
        embedding_size: Embedding dimension d.
        final_activation: `relu` | `soft_threshold` | `none` (see models/embedding.py).
        input_size: Input height (and width, unless `input_width` is set); images
            are resized to it.
        width: Channel width multiplier of the backbone.
        input_width: Input width when it differs from the height (SphereFace-20
            takes 112x96); 0 means square.
        dropout: Dropout rate before the embedding layer (IResNet's "E" output).
        se: Squeeze-and-excitation blocks, for backbones that offer them (MobileNetV2).
    """

    name: str = "mobilefacenet"
    embedding_size: int = 128
    final_activation: str = "none"
    input_size: int = 112
    width: float = 1.0
    input_width: int = 0
    dropout: float = 0.0
    se: bool = False

    @property
    def input_shape(self) -> tuple[int, int]:
        """(height, width) of the model's input images."""
        return self.input_size, self.input_width or self.input_size


@dataclass(frozen=True)
class HeadConfig:
    """Classification head / loss.

    Attributes:
        name: A name in `sparse_embed.heads.HEADS`.
        scale: Logit scale s of the normalised heads.
        margin: Additive angular margin m (ArcFace).
        sharded: Partial FC: split the class centres over the workers (each
            holds about C/N of them); only for the normalised margin heads.
        sample_rate: With `sharded`, the fraction of each worker's negative
            classes in a step's logits, in (0, 1]; positives are always kept.
        loss: Loss of the margin heads' logits: `softmax_ce` | `focal`.
        focal_gamma: Focusing parameter gamma of the focal loss.
        sub_centers: Sub-centres per class (sub-center ArcFace); 1 is plain.
        m1: Multiplicative angular margin of `combined`: s(cos(m1 theta + m2) - m3).
        m2: Additive angular margin of `combined`.
        m3: Additive cosine margin of `combined`.
        lambda_base: SphereFace annealing: lambda = max(lambda_min,
            lambda_base * (1 + lambda_gamma * step) ** -lambda_power).
        lambda_gamma: See `lambda_base`.
        lambda_power: See `lambda_base`.
        lambda_min: See `lambda_base`.
        mining: Triplet mining: `semi_hard` | `batch_hard` | `all`.
        distance: Distance of the pair losses: `cosine` | `squared_euclidean`.
        pos_margin: Contrastive loss: positive pairs closer than this cost nothing.
        neg_margin: Contrastive loss: negative pairs farther than this cost nothing.
        ms_alpha: Multi-Similarity alpha (positive weight).
        ms_beta: Multi-Similarity beta (negative weight).
        ms_base: Multi-Similarity lambda (similarity offset).
        ms_epsilon: Multi-Similarity mining margin.
        proxy_alpha: Proxy-Anchor scale alpha.
        proxy_delta: Proxy-Anchor margin delta.
        proxy_lr_multiplier: Learning-rate multiplier of the proxies.
        gather_batch: Pair losses: all-gather embeddings and labels over the
            workers first (more pairs per step, one all-gather more).

    `margin` is each head's own margin: ArcFace's angle, CosFace's cosine
    margin, SphereFace's integer multiplier, the triplet margin.
    """

    name: str = "arcface"
    scale: float = 64.0
    margin: float = 0.5
    sharded: bool = False
    sample_rate: float = 1.0
    loss: str = "softmax_ce"
    focal_gamma: float = 2.0
    sub_centers: int = 1
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    lambda_base: float = 1000.0
    lambda_gamma: float = 0.12
    lambda_power: float = 1.0
    lambda_min: float = 5.0
    mining: str = "semi_hard"
    distance: str = "cosine"
    pos_margin: float = 0.0
    neg_margin: float = 0.5
    ms_alpha: float = 2.0
    ms_beta: float = 50.0
    ms_base: float = 0.5
    ms_epsilon: float = 0.1
    proxy_alpha: float = 32.0
    proxy_delta: float = 0.1
    proxy_lr_multiplier: float = 100.0
    gather_batch: bool = False


@dataclass(frozen=True)
class SparsityConfig:
    """Sparsity regularizer on the L2-normalised embeddings (Paria et al., 2020).

    Attributes:
        type: `flops` | `l1` | `none`.
        weight: Regularizer weight (the paper's l1_parameter).
        schedule: `constant` | `quadratic_warmup` (the paper's dynamic_4).
        warmup_steps: T of the quadratic warm-up w * min(1, (t/T)^2).
        zero_threshold: |e_j| at or below this counts as zero in the statistics.
        cross_replica: FLOPs regularizer only: average the per-dimension mean
            |e_j| over all workers before squaring, so N workers with batch B
            compute the regularizer of one batch of N*B. False keeps the
            per-worker batch statistic of the original implementation.
    """

    type: str = "none"
    weight: float = 0.0
    schedule: str = "quadratic_warmup"
    warmup_steps: int = 1000
    zero_threshold: float = 1e-6
    cross_replica: bool = False


@dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer.

    Attributes:
        name: `sgd` | `adam` | `adamw`.
        momentum: SGD momentum.
        weight_decay: Decoupled weight decay (`adamw`, `sgd`).
        clipnorm: Global gradient-norm clip; 0 disables it.
    """

    name: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    clipnorm: float = 0.0


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule.

    Attributes:
        name: `constant` | `piecewise` | `cosine`.
        base_lr: Peak learning rate.
        warmup_steps: Linear warm-up from 0 to `base_lr`.
        boundaries: Steps where `piecewise` multiplies the rate by `decay_rate`.
        decay_rate: Factor applied at each `piecewise` boundary.
    """

    name: str = "piecewise"
    base_lr: float = 0.1
    warmup_steps: int = 0
    boundaries: tuple[int, ...] = ()
    decay_rate: float = 0.1


@dataclass(frozen=True)
class TrainConfig:
    """Training loop.

    Attributes:
        batch_size: Global batch size, split across workers (per worker when
            `distributed.scale_lr` is true).
        steps: Total optimizer steps.
        checkpoint_every: Save a checkpoint every this many steps (and at the end).
        log_every: Write TensorBoard scalars every this many steps.
        keep_checkpoints: Checkpoints kept on disk.
        seed: Seed of weight init, shuffling and augmentation.
        mixed_precision: Run the backbone in float16 (Keras `mixed_float16`)
            with dynamic loss scaling; the embedding normalisation, the
            sparsity regularizer and the head's logits and loss stay float32.
        init_from: A trained run's directory whose latest backbone and head
            weights start this run (a fresh optimizer, step 0), e.g. to
            fine-tune it with `compression`; ignored once this run has a checkpoint.
    """

    batch_size: int = 128
    steps: int = 10000
    checkpoint_every: int = 1000
    log_every: int = 50
    keep_checkpoints: int = 3
    seed: int = 0
    mixed_precision: bool = False
    init_from: str = ""


@dataclass(frozen=True)
class DistributedConfig:
    """How training is spread over workers (see training/distributed.py).

    Attributes:
        backend: `auto` (Horovod under `horovodrun`, `multi_worker` when
            TF_CONFIG is set, otherwise one process) | `none` | `horovod` |
            `mirrored` (all local GPUs, one process) | `multi_worker`.
        scale_lr: The linear scaling rule of Goyal et al. (2017): every worker
            takes `train.batch_size` examples per step, so the global batch is
            N * batch_size, and the peak learning rate is N * base_lr, reached
            by the linear warm-up over `schedule.warmup_steps`. False:
            `train.batch_size` is the global batch, split over the workers,
            and the learning rate does not depend on N.
    """

    backend: str = "auto"
    scale_lr: bool = False


# Metrics `eval.keep_best` may choose, and which way is better: higher (`max`) or lower (`min`).
BEST_METRICS: Registry[str] = Registry("eval.keep_best metric")
for _name in ("accuracy", "auc", "tar@far=1e-3"):
    BEST_METRICS.register(_name)("max")
for _name in ("eer", "mean_nnz", "flops_per_pair"):
    BEST_METRICS.register(_name)("min")


@dataclass(frozen=True)
class EvalSetConfig:
    """One verification set evaluated during training (an item of `eval.sets`).

    A set is either a pairs file with its image root or an InsightFace `.bin`
    pack; with neither, it is the run's own `data.pairs` under
    `data.pairs_images`. In YAML a bare name is short for a set with only a
    name: `sets: [lfw]` evaluates the run's own pairs as `lfw`.

    Attributes:
        name: The set's name in the TensorBoard tags (`eval/<name>/accuracy`)
            and in `eval.keep_best`.
        pairs: LFW-format pairs file, relative to `--data_dir`; empty with an
            empty `bin`: `data.pairs`.
        images: Image root of the pairs, relative to `--data_dir`; empty: `data.pairs_images`.
        bin: InsightFace verification pack (`lfw.bin`, `cfp_fp.bin`), relative to `--data_dir`.
    """

    name: str = ""
    pairs: str = ""
    images: str = ""
    bin: str = ""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"every item of eval.sets needs a name without '/' (it becomes the "
                              f"tag eval/<name>/accuracy); got {self.name!r}")
        if self.bin and (self.pairs or self.images):
            raise ConfigError(f"eval.sets item {self.name!r} sets both bin and pairs/images; a set "
                              f"is either a .bin pack or a pairs file with its images")


@dataclass(frozen=True)
class EvalConfig:
    """Embedding extraction and evaluation, after training and during it.

    Attributes:
        batch_size: Images per embedding batch.
        flip: Flip test-time augmentation: `none` | `sum` | `concat`. Evaluation
            during training embeds with flip-sum when this is `none`.
        nfolds: Folds of the verification protocol.
        every_steps: Evaluate `sets` every this many steps and at the end of
            training; 0 turns evaluation during training off.
        sets: The verification sets evaluated during training.
        keep_best: `<set>/<metric>` (e.g. `lfw/accuracy`): keep the backbone of
            the best evaluation in `model_dir/best/`; the metric is one of
            `BEST_METRICS`, which says whether higher or lower is better. Empty: off.
    """

    batch_size: int = 128
    flip: str = "none"
    nfolds: int = 10
    every_steps: int = 0
    sets: tuple[EvalSetConfig, ...] = (EvalSetConfig(name="lfw"),)
    keep_best: str = ""

    def __post_init__(self) -> None:
        names = [s.name for s in self.sets]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError(f"eval.sets names {', '.join(repeated)} more than once; give every "
                              f"set its own name")
        if self.every_steps and not self.sets:
            raise ConfigError("eval.every_steps needs at least one set in eval.sets, e.g. "
                              "eval.sets=[lfw] for the run's own data.pairs")
        if not self.keep_best:
            return
        if not self.every_steps:
            raise ConfigError(f"eval.keep_best={self.keep_best} needs evaluation during training; "
                              f"set eval.every_steps > 0")
        set_name, sep, metric = self.keep_best.partition("/")
        if not sep or set_name not in names:
            raise ConfigError(f"eval.keep_best={self.keep_best} must be <set>/<metric> with a set of "
                              f"eval.sets ({', '.join(names)}), e.g. {names[0]}/accuracy")
        BEST_METRICS.get(metric)

    @property
    def best_set(self) -> str:
        """The set `keep_best` chooses by (empty when it is off)."""
        return self.keep_best.partition("/")[0]

    @property
    def best_metric(self) -> str:
        """The metric `keep_best` chooses by (empty when it is off)."""
        return self.keep_best.partition("/")[2]


@dataclass(frozen=True)
class CompressionConfig:
    """Quantization-aware training and pruning of the backbone and embedding (TF-MOT).

    The head is never compressed: it is thrown away after training. A
    compressed run usually starts from a trained one (`train.init_from`).

    Attributes:
        type: `none` | `qat` (fake-quantized weights and activations) | `prune`
            (magnitude pruning) | `prune_qat` (pruning-preserving QAT of an
            already pruned run: the zeros stay zeros through int8).
        bits: Weight bits of QAT; 8 is TF-MOT's default scheme (what TFLite
            deploys), 4..7 its experimental n-bit scheme (accuracy studies only).
        activation_bits: Activation bits of the n-bit scheme (TFLite converts 8 only).
        target_sparsity: Fraction of each pruned kernel's weights set to zero at `end_step`.
        schedule: `polynomial` (TF-MOT's PolynomialDecay from 0 to the target
            between `begin_step` and `end_step`) | `constant` (the target from `begin_step`).
        m_by_n: `[m, n]` structured sparsity (e.g. `[2, 4]`: at most 2 non-zeros in
            every 4 consecutive weights); empty for unstructured pruning.
        begin_step: Step (counted from the start of this run) where pruning begins.
        end_step: Step where the sparsity reaches the target; 0 means `train.steps`.
        frequency: Masks are recomputed every this many steps.
    """

    type: str = "none"
    bits: int = 8
    activation_bits: int = 8
    target_sparsity: float = 0.5
    schedule: str = "polynomial"
    m_by_n: tuple[int, ...] = ()
    begin_step: int = 0
    end_step: int = 0
    frequency: int = 10


@dataclass(frozen=True)
class Config:
    """A whole run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)


# Values a field may take, checked when the config is built so a typo fails
# before any data is read. Registries are consulted at build time instead.
_CHOICES: dict[str, tuple[str, ...]] = {
    "data.sampler": ("shuffle", "p_k"),
    "data.augmentation": ("full", "flip"),
    "model.final_activation": ("relu", "soft_threshold", "none"),
    "sparsity.type": ("flops", "l1", "none"),
    "sparsity.schedule": ("constant", "quadratic_warmup"),
    "optimizer.name": ("sgd", "adam", "adamw"),
    "schedule.name": ("constant", "piecewise", "cosine"),
    "eval.flip": ("none", "sum", "concat"),
    "distributed.backend": ("auto", "none", "horovod", "mirrored", "multi_worker"),
    "head.loss": ("softmax_ce", "focal"),
    "head.mining": ("semi_hard", "batch_hard", "all"),
    "head.distance": ("cosine", "squared_euclidean"),
    "compression.type": ("none", "qat", "prune", "prune_qat"),
    "compression.schedule": ("polynomial", "constant"),
}


# Lists of sections whose items may be given as one string: the value of this key.
_SCALAR_FORMS: dict[str, str] = {"eval.sets": "name"}


# Numeric ranges, checked with the types, so `train.batch_size=-4` is one line
# before TensorFlow starts rather than a traceback from deep inside it.
_AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
_POSITIVE = (lambda v: v > 0, "> 0")
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data.shuffle_buffer": _AT_LEAST_1,
    "data.classes_per_batch": _AT_LEAST_1,
    "data.samples_per_class": _AT_LEAST_1,
    "model.embedding_size": _AT_LEAST_1,
    "model.input_size": _AT_LEAST_1,
    "model.width": _POSITIVE,
    "head.scale": _POSITIVE,
    "head.margin": _NON_NEGATIVE,
    "head.sample_rate": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "model.input_width": _NON_NEGATIVE,
    "model.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "head.focal_gamma": _NON_NEGATIVE,
    "head.sub_centers": _AT_LEAST_1,
    "head.m1": _POSITIVE,
    "head.lambda_base": _NON_NEGATIVE,
    "head.lambda_gamma": _NON_NEGATIVE,
    "head.lambda_power": _NON_NEGATIVE,
    "head.lambda_min": _NON_NEGATIVE,
    "head.ms_alpha": _POSITIVE,
    "head.ms_beta": _POSITIVE,
    "head.ms_epsilon": _NON_NEGATIVE,
    "head.proxy_alpha": _POSITIVE,
    "head.proxy_delta": _NON_NEGATIVE,
    "head.proxy_lr_multiplier": _POSITIVE,
    "sparsity.weight": _NON_NEGATIVE,
    "sparsity.warmup_steps": _NON_NEGATIVE,
    "sparsity.zero_threshold": _NON_NEGATIVE,
    "optimizer.momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optimizer.weight_decay": _NON_NEGATIVE,
    "optimizer.clipnorm": _NON_NEGATIVE,
    "schedule.base_lr": _NON_NEGATIVE,
    "schedule.warmup_steps": _NON_NEGATIVE,
    "schedule.boundaries": _NON_NEGATIVE,
    "schedule.decay_rate": _POSITIVE,
    "train.batch_size": _AT_LEAST_1,
    "train.steps": _AT_LEAST_1,
    "train.checkpoint_every": _AT_LEAST_1,
    "train.log_every": _AT_LEAST_1,
    "train.keep_checkpoints": _AT_LEAST_1,
    "eval.batch_size": _AT_LEAST_1,
    "eval.nfolds": _AT_LEAST_1,
    "eval.every_steps": _NON_NEGATIVE,
    "compression.bits": (lambda v: 2 <= v <= 8, "in [2, 8]"),
    "compression.activation_bits": (lambda v: 2 <= v <= 8, "in [2, 8]"),
    "compression.target_sparsity": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "compression.m_by_n": _AT_LEAST_1,
    "compression.begin_step": _NON_NEGATIVE,
    "compression.end_step": _NON_NEGATIVE,
    "compression.frequency": _AT_LEAST_1,
}


def _check_range(path: str, value: Any) -> Any:
    check = _RANGES.get(path)
    if check is not None and not check[0](value):
        raise ConfigError(f"config key {path!r} must be {check[1]}; got {value!r}")
    return value


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    # `from __future__ import annotations` leaves field types as strings.
    return typing.get_type_hints(cls)


def _unknown_key(path: str) -> ConfigError:
    """Names the closest valid key, matching the path one segment at a time."""
    cls: Any = Config
    known: list[str] = []
    for part in path.split("."):
        fields = _field_types(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            close = difflib.get_close_matches(part, fields, n=1, cutoff=0.4)
            if close:
                return ConfigError(
                    f"unknown config key {path!r}; did you mean {'.'.join([*known, close[0]])!r}?"
                )
            break
        known.append(part)
        cls = fields[part]
        if typing.get_origin(cls) is tuple:
            # A list of sections (`eval.sets`): its items' keys follow the list's.
            cls = next(a for a in typing.get_args(cls) if a is not Ellipsis)
    return ConfigError(f"unknown config key {path!r}")


def _coerce(path: str, value: Any, typ: Any) -> Any:
    """Checks `value` against the field type `typ`, converting where lossless."""
    origin = typing.get_origin(typ)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {path!r} expects a list, got {value!r}")
        (item,) = {a for a in typing.get_args(typ) if a is not Ellipsis}
        if dataclasses.is_dataclass(item):
            key = _SCALAR_FORMS.get(path)
            return tuple(_build(item, {key: v} if key and isinstance(v, str) else v, path + ".")
                         for v in value)
        return tuple(_coerce(path, v, item) for v in value)
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"config key {path!r} has an unsupported type {typ}")
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return _check_range(path, value)
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _check_range(path, float(value))
        # YAML 1.1 reads `1e-3` (no dot, no sign in the exponent) as a string.
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                return _check_range(path, number)
    elif typ is str:
        if isinstance(value, str):
            choices = _CHOICES.get(path)
            if choices and value not in choices:
                raise ConfigError(
                    f"config key {path!r} must be one of {', '.join(choices)}; got {value!r}"
                )
            return value
    raise ConfigError(f"config key {path!r} expects {typ.__name__}, got {value!r}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'!r} must be a mapping")
    fields = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in fields:
            raise _unknown_key(path)
        typ = fields[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = _build(typ, value or {}, path + ".")
        else:
            kwargs[key] = _coerce(path, value, typ)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], path: str, value: Any) -> None:
    node = tree
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise _unknown_key(path)
    node[parts[-1]] = value


def find_config(name_or_path: str) -> Path:
    """Returns the YAML file of a packaged config name or a path.

    Args:
        name_or_path: A packaged name (`smoke`, `face/sparse_mobilefacenet_flops`) or a YAML path.

    Raises:
        ConfigError: If neither exists; the message lists the packaged names.
    """
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    packaged = CONFIG_DIR / f"{name_or_path}.yaml"
    if packaged.is_file():
        return packaged
    names = sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.rglob("*.yaml"))
    raise ConfigError(
        f"config {name_or_path!r} is neither a YAML file nor a packaged config; "
        f"packaged: {', '.join(names)}"
    )


def load_config(name_or_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Builds a `Config` from a YAML file and dotted overrides.

    Args:
        name_or_path: Packaged config name or YAML path; None starts from the defaults.
        overrides: `key.path=value` strings; values are parsed as YAML scalars/lists.

    Returns:
        The validated, frozen config.

    Raises:
        ConfigError: On a missing file, bad YAML, unknown key or wrong value type.
    """
    tree: dict[str, Any] = {}
    if name_or_path is not None:
        path = find_config(name_or_path)
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config {path} is not valid YAML: {e}".replace("\n", " ")) from e
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return _build(Config, tree)


def config_to_dict(config: Config) -> dict[str, Any]:
    """Returns the config as nested plain dicts (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(config))


def save_config(config: Config, path: str | Path) -> None:
    """Writes the resolved config as YAML, atomically.

    Args:
        config: The config to write.
        path: Destination, usually `model_dir/config.yaml`.
    """
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def config_from_model_dir(model_dir: str | Path) -> Config:
    """Loads the resolved config a training run wrote into its model directory.

    Args:
        model_dir: A training output directory.

    Raises:
        ConfigError: If the directory holds no config.yaml.
    """
    path = Path(model_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path} not found: is {model_dir} a model_dir written by sparse_embed.train?")
    return load_config(str(path))
