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

from sparse_embed.distributions import DISTRIBUTIONS, Distribution, build_distribution
from sparse_embed.distributions.gaussian import COVARIANCES
from sparse_embed.distributions.parametrization import PARAMETRIZATIONS
from sparse_embed.distributions.vmf import CONCENTRATIONS
from sparse_embed.errors import ConfigError
from sparse_embed.fileio import atomic_path
from sparse_embed.heads.params import HEADS, LEGACY_FIELDS, LEGACY_FLAT, choices, positive
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


# The parts of a model `train.freeze` and `train.reinit` may name (training/trainer.py freezes them,
# or starts them fresh instead of from `train.init_from`).
FREEZABLE = ("backbone", "embedding", "head")


@dataclass(frozen=True)
class DistributionConfig:
    """What the model's output is read as: a point (`dirac`) or a distribution per input.

    A non-`dirac` model outputs a parameter vector `[mean (D) | extra]`: the
    embedding layer gives the mean and an extra head on the same features
    predicts the variance (`gaussian`) or the concentration (`vmf`), laid out
    and parametrized as in `sparse_embed.distributions`. A field applies to the
    distributions that take it (the registered class's own options); set away
    from its default on another it is an error.

    Attributes:
        name: `dirac` (today's point embeddings) | `gaussian` | `vmf`.
        spherical: `dirac`, `gaussian`: the mean (and evaluated points) on the unit sphere.
        covariance: `gaussian`: `spherical` (one variance, 1 extra parameter) |
            `diagonal` (one per axis, D extra parameters).
        parametrization: `gaussian`, `vmf`: how the extra head's output maps to
            the variance or 1/kappa: `invlin` | `exp`.
        max_logivar: `gaussian`: the largest log inverse variance (the variance's floor exp(-max_logivar)).
        kappa: `vmf`: `separate` (an extra head predicts it) | `norm` (kappa is
            the mean's norm; no extra head, vMF-loss).
        max_logk: `vmf` with `kappa=separate`: the largest log concentration.
    """

    # The valid values are the distributions' own (field metadata, as `head.params` declares them).
    name: str = "dirac"
    spherical: bool = False
    covariance: str = field(default="spherical", metadata=choices(*COVARIANCES))
    parametrization: str = field(default="invlin", metadata=choices(*PARAMETRIZATIONS))
    max_logivar: float = field(default=10.0, metadata=positive())
    kappa: str = field(default="separate", metadata=choices(*CONCENTRATIONS))
    max_logk: float = field(default=10.0, metadata=positive())

    def __post_init__(self) -> None:
        try:
            cls = DISTRIBUTIONS.get(self.name)
        except ConfigError as e:
            raise ConfigError(f"config key 'model.distribution.name': {e}") from e
        takes = [f.name for f in dataclasses.fields(cls) if f.name != "dim"]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "name" and f.name not in takes and value != f.default:
                raise ConfigError(f"model.distribution.{f.name}={value!r} does not apply to "
                                  f"model.distribution.name={self.name}; leave it at {f.default!r} "
                                  f"({self.name} takes: {', '.join(takes)})")

    @property
    def options(self) -> dict[str, Any]:
        """The options the named distribution takes, as `build_distribution` takes them."""
        takes = {f.name for f in dataclasses.fields(DISTRIBUTIONS.get(self.name))}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in takes}

    def build(self, dim: int) -> Distribution:
        """The distribution of embedding dimension `dim`.

        Args:
            dim: D, the mean's dimension (`model.embedding_size`).

        Raises:
            ConfigError: If the dimension does not suit it (a vMF needs D >= 2).
        """
        return build_distribution(self.name, dim, **self.options)


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
        distribution: What the output is read as (`DistributionConfig`): `dirac`
            (a point, the default) or a distribution whose extra parameters an
            extra head predicts, e.g. `distribution: {name: gaussian, spherical: true}`.
    """

    name: str = "mobilefacenet"
    embedding_size: int = 128
    final_activation: str = "none"
    input_size: int = 112
    width: float = 1.0
    input_width: int = 0
    dropout: float = 0.0
    se: bool = False
    distribution: DistributionConfig = field(default_factory=DistributionConfig)

    @property
    def input_shape(self) -> tuple[int, int]:
        """(height, width) of the model's input images."""
        return self.input_size, self.input_width or self.input_size


@dataclass(frozen=True)
class HeadConfig:
    """Classification head / loss: what every head shares, and the head's own `params`.

    Attributes:
        name: A name in `sparse_embed.heads.HEADS`.
        sharded: Partial FC: split the class centres over the workers (each
            holds about C/N of them); only for the normalised margin heads.
        sample_rate: With `sharded`, the fraction of each worker's negative
            classes in a step's logits, in (0, 1]; positives are always kept.
        loss: Loss of the margin heads' logits: `softmax_ce` | `focal`.
        focal_gamma: Focusing parameter gamma of the focal loss.
        sub_centers: Sub-centres per class (sub-center ArcFace); 1 is plain.
        gather_batch: Pair losses: all-gather embeddings and labels over the
            workers first (more pairs per step, one all-gather more).
        params: The head's own parameters: an instance of the class `HEADS`
            registers under `name` (heads/params.py), whose fields and
            defaults are the head layer's keyword arguments. In YAML a
            mapping, e.g. `params: {scale: 64.0, margin: 0.5}`; omitted
            parameters take the head's defaults.

    A shared field applies to some heads only (`HeadParams.shared` says
    which); set away from its default on another head it is an error.
    """

    name: str = "arcface"
    sharded: bool = False
    sample_rate: float = 1.0
    loss: str = "softmax_ce"
    focal_gamma: float = 2.0
    sub_centers: int = 1
    gather_batch: bool = False
    params: Any = None

    def __post_init__(self) -> None:
        params_class = HEADS.get(self.name)
        if self.params is None:
            object.__setattr__(self, "params", params_class())
        elif type(self.params) is not params_class:
            raise ConfigError(f"head.params of head {self.name!r} must be {params_class.__name__}, "
                              f"got {type(self.params).__name__}")
        defaults = HeadConfig.__dataclass_fields__
        for name in _HEAD_SHARED:
            value = getattr(self, name)
            if name not in params_class.shared and value != defaults[name].default:
                applies = ", ".join(f"head.{n}" for n in params_class.shared) or "none"
                raise ConfigError(f"head.{name}={value!r} does not apply to head {self.name!r}; "
                                  f"leave it at {defaults[name].default!r} (the shared keys "
                                  f"{self.name} takes: {applies})")


# The shared `head` fields whose use depends on the head (`HeadParams.shared`).
_HEAD_SHARED = ("sharded", "sample_rate", "loss", "focal_gamma", "sub_centers", "gather_batch")


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
            fine-tune it with `compression`, or the deterministic run a
            two-stage probabilistic method starts from (its backbone and mean;
            the extra head starts fresh); ignored once this run has a checkpoint.
        freeze: Parts that do not train: `backbone` (the features before the
            embedding layer), `embedding` (the embedding layer: the mean),
            `head` (the loss's own weights). Frozen batch norms keep their
            statistics. E.g. `[backbone, embedding]`: only the extra head of a
            probabilistic model trains (PFE, SCF).
        reinit: Parts that start from this run's own initialisation instead of
            `init_from`'s weights (names as `freeze`; they must train). E.g.
            `[embedding]`: the reference's DUL-reg stage 2, which keeps the init
            run's backbone and class centres and re-initialises the embedding layer.
    """

    batch_size: int = 128
    steps: int = 10000
    checkpoint_every: int = 1000
    log_every: int = 50
    keep_checkpoints: int = 3
    seed: int = 0
    mixed_precision: bool = False
    init_from: str = ""
    freeze: tuple[str, ...] = field(default=(), metadata=choices(*FREEZABLE))
    reinit: tuple[str, ...] = field(default=(), metadata=choices(*FREEZABLE))

    def __post_init__(self) -> None:
        parts = ", ".join(self.reinit)
        if self.reinit and not self.init_from:
            raise ConfigError(f"train.reinit=[{parts}] re-initialises parts of the run train.init_from "
                              f"loads; pass --init_from=RUN, or leave train.reinit empty")
        both = [part for part in self.reinit if part in self.freeze]
        if both:
            raise ConfigError(f"train.reinit and train.freeze both name {', '.join(both)}: a re-initialised "
                              f"part must train; drop it from train.freeze")


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

    def __post_init__(self) -> None:
        applies = _COMPRESSION_FIELDS.get(self.type, ())
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "type" and f.name not in applies and value != f.default:
                raise ConfigError(f"compression.{f.name}={value!r} does not apply to compression.type="
                                  f"{self.type}; leave it at {f.default!r} (compression.type={self.type} "
                                  f"takes: {', '.join(applies) or 'nothing'})")


# The compression fields each `compression.type` reads: a field set on another type is an error.
_COMPRESSION_FIELDS: dict[str, tuple[str, ...]] = {
    "none": (),
    "qat": ("bits", "activation_bits"),
    "prune": ("target_sparsity", "schedule", "m_by_n", "begin_step", "end_step", "frequency"),
    "prune_qat": ("bits", "activation_bits"),
}


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
    "head.sample_rate": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "model.input_width": _NON_NEGATIVE,
    "model.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "head.focal_gamma": _NON_NEGATIVE,
    "head.sub_centers": _AT_LEAST_1,
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


@dataclass(frozen=True)
class _Rules:
    """The value checks of one field: a (predicate, "must be ..." text) and/or valid strings."""

    check: tuple[Callable[[Any], bool], str] | None = None
    choices: tuple[str, ...] | None = None


def _rules(cls: type, key: str, path: str) -> _Rules:
    """A field's checks: its own metadata (head parameters), else `_RANGES` / `_CHOICES`."""
    metadata = cls.__dataclass_fields__[key].metadata
    return _Rules(metadata.get("check", _RANGES.get(path)), metadata.get("choices", _CHOICES.get(path)))


def _check_range(path: str, value: Any, rules: _Rules) -> Any:
    if rules.check is not None and not rules.check[0](value):
        raise ConfigError(f"config key {path!r} must be {rules.check[1]}; got {value!r}")
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


def _coerce(path: str, value: Any, typ: Any, rules: _Rules) -> Any:
    """Checks `value` against the field type `typ` and its `rules`, converting where lossless."""
    origin = typing.get_origin(typ)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {path!r} expects a list, got {value!r}")
        (item,) = {a for a in typing.get_args(typ) if a is not Ellipsis}
        if dataclasses.is_dataclass(item):
            key = _SCALAR_FORMS.get(path)
            return tuple(_build(item, {key: v} if key and isinstance(v, str) else v, path + ".")
                         for v in value)
        return tuple(_coerce(path, v, item, rules) for v in value)
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"config key {path!r} has an unsupported type {typ}")
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return _check_range(path, value, rules)
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _check_range(path, float(value), rules)
        # YAML 1.1 reads `1e-3` (no dot, no sign in the exponent) as a string.
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                return _check_range(path, number, rules)
    elif typ is str:
        if isinstance(value, str):
            if rules.choices and value not in rules.choices:
                raise ConfigError(
                    f"config key {path!r} must be one of {', '.join(rules.choices)}; got {value!r}"
                )
            return value
    raise ConfigError(f"config key {path!r} expects {typ.__name__}, got {value!r}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'!r} must be a mapping")
    if cls is HeadConfig:
        return _build_head(values, prefix)
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
            kwargs[key] = _coerce(path, value, typ, _rules(cls, key, path))
    return cls(**kwargs)


def _build_head(values: dict[str, Any], prefix: str) -> HeadConfig:
    """Builds the head section: the shared fields, then `params` by the schema `name` selects."""
    name = values.get("name", HeadConfig.name)
    if not isinstance(name, str):
        raise ConfigError(f"config key '{prefix}name' expects str, got {name!r}")
    params_class = HEADS.get(name)
    params_keys = [f.name for f in dataclasses.fields(params_class)]
    shared = {k: v for k, v in values.items() if k != "params"}
    for key in shared:
        if key not in _field_types(HeadConfig) and (key in params_keys or key in LEGACY_FLAT):
            raise ConfigError(f"config key '{prefix}{key}' is not a shared head field; the "
                              f"parameters of head {name!r} go under {prefix}params: "
                              f"{', '.join(params_keys) or 'none'}")
    head = _build_plain(HeadConfig, shared, prefix)
    params = values.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"config section '{prefix}params' must be a mapping, got {params!r}")
    for key in params:
        if key not in params_keys:
            close = difflib.get_close_matches(key, params_keys, n=1, cutoff=0.6)
            hint = f"; did you mean {prefix}params.{close[0]}?" if close else ""
            raise ConfigError(f"unknown config key '{prefix}params.{key}': head {name!r} takes "
                              f"{', '.join(params_keys) or 'no parameters'}{hint}")
    return dataclasses.replace(head, params=_build_plain(params_class, params, f"{prefix}params."))


def _build_plain(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Builds a section whose fields are all scalars or lists (no nested sections)."""
    fields = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in fields:
            raise _unknown_key(path)
        kwargs[key] = _coerce(path, value, fields[key], _rules(cls, key, path))
    return cls(**kwargs)


def upgrade_legacy_head(tree: dict[str, Any]) -> dict[str, Any]:
    """Maps a config tree written before `head.params` onto today's layout.

    Run directories trained before per-head parameters recorded every
    parameter as a flat field of `head` (`head.margin`, `head.ms_alpha`,
    ...). Their values move to `head.params` under the head's own names
    (`heads.params.LEGACY_FIELDS`); the fields the head did not read, and
    shared fields that did not apply to it, are dropped, as training ignored
    them. A tree already in today's layout is returned unchanged.

    Args:
        tree: The config as plain nested dicts (parsed YAML).

    Returns:
        The tree with a `head.params` section.
    """
    head = tree.get("head")
    if not isinstance(head, dict) or "params" in head or not LEGACY_FLAT & set(head):
        return tree
    name = head.get("name", HeadConfig.name)
    params_class = HEADS.get(name)
    mapping = LEGACY_FIELDS[name]
    params: dict[str, Any] = {}
    for old, new in mapping.items():
        if old in head:
            value = head[old]
            # The old flat `margin` was a float; SphereFace's multiplier is an integer.
            if _field_types(params_class)[new] is int and isinstance(value, float) \
                    and value.is_integer():
                value = int(value)
            params[new] = value
    defaults = HeadConfig.__dataclass_fields__
    upgraded = {k: v for k, v in head.items()
                if k not in LEGACY_FLAT and (k not in _HEAD_SHARED or k in params_class.shared
                                             or v == defaults[k].default)}
    upgraded["params"] = params
    return {**tree, "head": upgraded}


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


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}".replace("\n", " ")) from e
    if not isinstance(tree, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(tree).__name__}")
    return tree


# Search-space declarations (`python -m sparse_embed.experiment hopt`): a `_hopt`
# mapping in any section names some of the section's keys and their ranges,
# e.g. `head: {params: {_hopt: {scale: {min: 1, max: 64, log: true}}}}`.
HOPT_KEY = "_hopt"


def split_search_space(tree: dict[str, Any], prefix: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """Separates the `_hopt` declarations of a parsed config tree from its settings.

    Args:
        tree: The config as plain nested dicts (parsed YAML); left unchanged.
        prefix: Dotted path of `tree` in the whole config (`head.params.`), for the keys returned.

    Returns:
        (the tree without any `_hopt` mapping, dotted key -> its declaration
        as written, e.g. `{"head.params.scale": {"min": 1, "max": 64, "log": True}}`).
        The declarations are only collected here; `sparse_embed.experiment` checks them.

    Raises:
        ConfigError: If a `_hopt` entry is not a mapping of key names.
    """
    settings: dict[str, Any] = {}
    space: dict[str, Any] = {}
    for key, value in tree.items():
        if key == HOPT_KEY:
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{prefix}{HOPT_KEY}' must map keys of "
                                  f"{prefix.rstrip('.') or 'the config'} to search ranges, got {value!r}")
            space.update({f"{prefix}{name}": spec for name, spec in value.items()})
        elif isinstance(value, dict):
            settings[key], inner = split_search_space(value, f"{prefix}{key}.")
            space.update(inner)
        else:
            settings[key] = value
    return settings, space


def search_space(name_or_path: str) -> dict[str, Any]:
    """The `_hopt` declarations of a config file: dotted key -> declaration as written.

    Args:
        name_or_path: Packaged config name or YAML path.

    Raises:
        ConfigError: On a missing file, bad YAML, or a `_hopt` entry that is not a mapping.
    """
    return split_search_space(_read_yaml(find_config(name_or_path)))[1]


def load_config(name_or_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Builds a `Config` from a YAML file and dotted overrides.

    Args:
        name_or_path: Packaged config name or YAML path; None starts from the defaults.
            Its `_hopt` search ranges are left out (`split_search_space`).
        overrides: `key.path=value` strings; values are parsed as YAML scalars/lists.
            `head.name=NAME` naming another head than the file's drops the
            file's `head.params` (they are the other head's), so the new head
            starts from its defaults and the other overrides.

    Returns:
        The validated, frozen config.

    Raises:
        ConfigError: On a missing file, bad YAML, unknown key or wrong value type.
    """
    tree = _read_yaml(find_config(name_or_path)) if name_or_path is not None else {}
    # Search ranges are for `experiment hopt`; a run trains with the values set beside them.
    tree = split_search_space(tree)[0]
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        parsed.append((key.strip(), yaml.safe_load(raw)))
    # A new head comes first and starts from its own defaults: the file's
    # `head.params` belong to the head the file names.
    for key, value in sorted(parsed, key=lambda kv: kv[0] != "head.name"):
        if key == "head.name" and isinstance(tree.get("head"), dict) \
                and value != tree["head"].get("name", HeadConfig.name):
            tree["head"].pop("params", None)
        _set_dotted(tree, key, value)
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

    A config.yaml written before per-head parameters (flat `head` fields) is
    mapped onto `head.params` (`upgrade_legacy_head`), so old runs resume,
    embed, evaluate and export as they trained.

    Args:
        model_dir: A training output directory.

    Raises:
        ConfigError: If the directory holds no config.yaml, or it is not valid.
    """
    path = Path(model_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path} not found: is {model_dir} a model_dir written by sparse_embed.train?")
    return _build(Config, upgrade_legacy_head(_read_yaml(path)))


def head_config(name: str = "arcface", params: dict[str, Any] | None = None, **shared: Any) -> HeadConfig:
    """Builds a head section as a YAML `head:` mapping would, with the same checks.

    Args:
        name: A name in `sparse_embed.heads.HEADS`.
        params: The head's own parameters (`head.params`); omitted ones take its defaults.
        **shared: Shared `HeadConfig` fields (`sharded`, `loss`, `sub_centers`, ...).

    Raises:
        ConfigError: On an unknown head, parameter or field, or a bad value.
    """
    return _build_head({"name": name, **shared, "params": params or {}}, "head.")


def _yaml_scalar(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def check_head_distribution(config: Config) -> None:
    """Checks that the head reads the kind of output `model.distribution` gives.

    Each head declares what it needs (`HeadParams.distribution`): the
    deterministic heads a `dirac` output, each probabilistic method its own
    distribution (PFE a Gaussian on the sphere, SCF a vMF, ...).

    Args:
        config: The run config.

    Raises:
        ConfigError: If they do not match; the message names the settings the head needs.
    """
    needs = HEADS.get(config.head.name).distribution
    have = config.model.distribution
    wrong = {key: value for key, value in needs.items() if getattr(have, key) != value}
    if not wrong:
        return
    wanted = ", ".join(f"model.distribution.{k}={_yaml_scalar(v)}" for k, v in needs.items())
    got = ", ".join(f"model.distribution.{k}={_yaml_scalar(getattr(have, k))}" for k in wrong)
    raise ConfigError(f"head.name={config.head.name} needs {wanted} (got {got}); set "
                      + " ".join(f"--set model.distribution.{k}={_yaml_scalar(v)}" for k, v in needs.items()))
