"""From a trained model directory to embeddings, HDF5 files and verification results.

The library behind `python -m sparse_embed.embed` and `python -m sparse_embed.evaluate`.
Embeddings are L2-normalised, the form retrieval and verification use: the
inner product of two of them is their cosine similarity, and normalising keeps
every zero of a sparse embedding a zero. A probabilistic run's backbone
outputs parameter vectors `[mean | extra]`: its embedding is the normalised
mean, and `confidence_function` gives the distribution's confidence.

Verification pairs are scored with the run's test-time scorer (`PairScoring`,
its head's `scorer`): the cosine of the embeddings, or, for PFE, SCF and SPE,
the mutual likelihood score and, for HIB, its match probability, of the
parameter vectors. Where the run has a confidence the results add how well
the pair confidence (the smaller of its two images') predicts the pair's
errors (`sparse_embed.metrics.uncertainty`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sparse_embed import compression
from sparse_embed.checkpoints import CHECKPOINT_DIR, checkpoint_for, variable_key
from sparse_embed.config import Config, config_from_model_dir
from sparse_embed.data.embeddings import Embeddings
from sparse_embed.data.pipeline import bytes_dataset, files_dataset, missing_paths
from sparse_embed.data.verification import BinPack, Pairs, unique_images
from sparse_embed.distributions import Distribution
from sparse_embed.errors import ConfigError, DataError
from sparse_embed.heads import HEADS
from sparse_embed.keras import keras, tf
from sparse_embed.metrics.uncertainty import verification_confidence_metrics
from sparse_embed.metrics.verification import verification_metrics
from sparse_embed.models import build_model
from sparse_embed.models.embedding import mean_size
from sparse_embed.registry import Registry
from sparse_embed.search import SparseIndex
from sparse_embed.sparsity import sparsity_stats_np

# How the embeddings of an image and of its mirror image are combined.
FLIP_MODES: Registry = Registry("flip mode")
FLIP_MODES.register("none")(None)
FLIP_MODES.register("sum")(lambda e, e_flip: e + e_flip)
# MLPerf face protocol: both embeddings side by side (twice the dimension).
FLIP_MODES.register("concat")(lambda e, e_flip: tf.concat([e, e_flip], axis=-1))
# The confidence metrics `evaluate` adds where a run has a confidence.
CONFIDENCE_METRICS = ("confidence_auroc", "confidence_aupr", "confidence_aurcc")


def load_backbone(model_dir: str | os.PathLike, untrained: bool = False) -> tuple[keras.Model, Config]:
    """Rebuilds a run's backbone from `model_dir/config.yaml` and restores its latest weights.

    A compressed run's backbone is rebuilt with its compression (the same
    structure the trainer checkpointed): quantization-aware runs come back
    with their fake-quant, pruned runs with their wrappers (which mask the
    kernels when called; `sparse_embed.compression.for_export` strips them,
    giving the same outputs).

    Args:
        model_dir: A directory written by `sparse_embed.train`.
        untrained: Keep the fresh random initialisation (a baseline), skip the restore.

    Returns:
        (backbone, config).

    Raises:
        ConfigError: If `model_dir` has no config.yaml, or its checkpoint does not
            fit the backbone config.yaml describes (e.g. another `model.distribution`,
            whose parameter count needs another extra head).
        DataError: If it has no checkpoint.
    """
    config = config_from_model_dir(model_dir)
    keras.utils.set_random_seed(config.train.seed)
    backbone = build_backbone(config)
    if not untrained:
        latest = tf.train.latest_checkpoint(str(Path(model_dir) / CHECKPOINT_DIR))
        if latest is None:
            raise DataError(f"no checkpoint in {Path(model_dir) / CHECKPOINT_DIR}; train first")
        _restore_checked(backbone, config, latest, Path(model_dir))
        compression.after_restore(backbone)
    return backbone, config


def _layers_with_weights(backbone: keras.Model, keys: Sequence[str]) -> tuple[int, int]:
    """(layers with weights of the backbone, of the checkpoint's backbone), as Keras names them."""
    prefix = "backbone/layer_with_weights-"
    saved = {key[len(prefix):].partition("/")[0] for key in keys if key.startswith(prefix)}
    return sum(1 for layer in backbone.layers if layer.weights), len(saved)


def _restore_checked(backbone: keras.Model, config: Config, latest: str, model_dir: Path) -> None:
    """Restores `latest` into `backbone`; one line naming the mismatch if it does not fit.

    A training checkpoint also holds the head and the optimizer (left unread),
    but its backbone must be this one: a variable missing from it, one of
    another shape, or a layer with weights this backbone lacks (an extra head
    of a probabilistic run read with a `dirac` config) means config.yaml
    describes another model.
    """
    distribution = config.model.distribution
    parameters = backbone.output_shape[-1]
    wants = (f"model.distribution.name={distribution.name} ({parameters} parameters per image)")
    fix = f"evaluate the run with the config.yaml it was trained with ({model_dir / 'config.yaml'})"
    built, saved = _layers_with_weights(backbone, tf.train.load_checkpoint(latest)
                                        .get_variable_to_shape_map())
    if saved > built:
        raise ConfigError(f"checkpoint {latest} has {saved} layers with weights, the model of "
                          f"config.yaml {built} with {wants}: it was trained with another model or "
                          f"distribution; {fix}")
    try:
        checkpoint_for(backbone).restore(latest).expect_partial().assert_existing_objects_matched()
    except (AssertionError, ValueError) as e:
        missing = sorted(set(re.findall(r"<tf\.Variable '([^':]+)", str(e))))
        reason = (f"the checkpoint has no {', '.join(missing)}" if missing
                  else str(e).strip().splitlines()[0][:160])
        raise ConfigError(f"checkpoint {latest} does not fit the model of config.yaml with {wants} "
                          f"({reason}); {fix}") from None


def save_backbone(backbone: keras.Model, model_dir: str | os.PathLike, step: int,
                  head: keras.layers.Layer | None = None) -> Path:
    """Writes a backbone-only checkpoint where `load_backbone` looks for one.

    With the run's config.yaml beside it, `model_dir` is then a model
    directory `embed`, `evaluate` and `export` read.

    Args:
        backbone: A backbone built by `build_backbone` (or restored by `load_backbone`).
        model_dir: The directory; the checkpoint goes into its checkpoints/.
        step: The training step the weights are from (the checkpoint's number).
        head: The training head too, where testing needs its weights (HIB's scorer).

    Returns:
        The checkpoint's path prefix.
    """
    manager = tf.train.CheckpointManager(checkpoint_for(backbone, head),
                                         str(Path(model_dir) / CHECKPOINT_DIR), max_to_keep=1)
    return Path(manager.save(checkpoint_number=step))


def build_backbone(config: Config) -> keras.Model:
    """Builds a run's backbone with its compression: the structure its checkpoints hold.

    Args:
        config: The run config (`model`, `compression`, `train.steps`).

    Returns:
        A float32 backbone with fresh weights.
    """
    return compression.compress(build_model(config.model), config.compression, config.train.steps)


def embedding_function(backbone: keras.Model, flip: str = "none") -> Callable[[tf.Tensor], tf.Tensor]:
    """Returns images -> L2-normalised embeddings, traced once for every batch size.

    The function reads the backbone's variables when called, so it follows
    weights assigned after it was made. Of a probabilistic backbone's
    parameter vectors it takes the mean.

    Args:
        backbone: images -> embeddings (or parameter vectors `[mean | extra]`).
        flip: Flip test-time augmentation: `none`, `sum` or `concat`.
    """
    combine = FLIP_MODES.get(flip)
    size = backbone.input_shape[1:]
    dim = mean_size(backbone)

    def embed(images: tf.Tensor) -> tf.Tensor:
        outputs = backbone(images, training=False)
        return outputs if dim is None else outputs[:, :dim]

    # Any batch size, so the smaller last batch reuses the one trace; no AutoGraph
    # (the flip is decided in Python, and converting the model's calls costs seconds).
    @tf.function(input_signature=[tf.TensorSpec([None, *size], tf.float32)], autograph=False)
    def step(images: tf.Tensor) -> tf.Tensor:
        e = embed(images)
        if combine is not None:
            e = combine(e, embed(tf.image.flip_left_right(images)))
        return tf.math.l2_normalize(e, axis=-1)

    return step


def confidence_function(backbone: keras.Model, distribution: Distribution,
                        flip: str = "none") -> Callable[[tf.Tensor], tf.Tensor]:
    """Returns images -> the confidence of each image's distribution (higher: surer), float32 [B].

    The confidence is the distribution's own (`Distribution.confidence`): -mean
    log sigma^2 for a Gaussian, log kappa for a vMF. With a flip mode (`sum`
    or `concat`) an image is seen twice, as it is and mirrored, and its
    confidence is the smaller of the two views' confidences: the embedding
    combines both, and is only as trustworthy as the less certain one (the
    rule that gives a pair the smaller of its two images' confidences).

    Args:
        backbone: images -> parameter vectors, of a run whose `model.distribution`
            is `distribution` (not `dirac`, which has no confidence).
        distribution: `config.model.distribution.build(config.model.embedding_size)`.
        flip: Flip test-time augmentation: `none`, `sum` or `concat`.

    Raises:
        ConfigError: If the distribution has no confidence (`dirac`).
    """
    if not distribution.has_confidence:
        raise ConfigError("a dirac model (a point per image) has no confidence; train with "
                          "model.distribution.name=gaussian or vmf")
    flipped = FLIP_MODES.get(flip) is not None
    size = backbone.input_shape[1:]

    def confidence(images: tf.Tensor) -> tf.Tensor:
        return tf.cast(distribution.confidence(backbone(images, training=False)), tf.float32)

    @tf.function(input_signature=[tf.TensorSpec([None, *size], tf.float32)], autograph=False)
    def step(images: tf.Tensor) -> tf.Tensor:
        value = confidence(images)
        if flipped:
            value = tf.minimum(value, confidence(tf.image.flip_left_right(images)))
        return value

    return step


def parameters_function(backbone: keras.Model) -> Callable[[tf.Tensor], tf.Tensor]:
    """Returns images -> the backbone's parameter vectors `[mean | extra]` as they are, float32 [B, P].

    Args:
        backbone: images -> parameter vectors (or embeddings, for a `dirac` run).
    """
    size = backbone.input_shape[1:]

    @tf.function(input_signature=[tf.TensorSpec([None, *size], tf.float32)], autograph=False)
    def step(images: tf.Tensor) -> tf.Tensor:
        return tf.cast(backbone(images, training=False), tf.float32)

    return step


def embed_dataset(backbone: keras.Model, dataset: tf.data.Dataset, flip: str = "none",
                  total: int | None = None, distribution: Distribution | None = None) -> Embeddings:
    """Runs the backbone over a dataset of (image, label, filename) batches.

    Args:
        backbone: images -> embeddings (or parameter vectors).
        dataset: Batches of (float32 images in [-1, 1], int labels, string file names).
        flip: Flip test-time augmentation: `none`, `sum` or `concat`.
        total: Number of images, for the progress bar.
        distribution: The run's distribution; one with a confidence adds each
            image's (`confidence_function`, with the same flip mode).

    Returns:
        The L2-normalised embeddings (the means) in dataset order, with their
        confidences where the distribution has one.
    """
    confidence = None
    if distribution is not None and distribution.has_confidence:
        confidence = confidence_function(backbone, distribution, flip)
    return embed_with(embedding_function(backbone, flip), dataset, total, confidence)


def _run_batches(steps: dict[str, Callable[[tf.Tensor], tf.Tensor]], dataset: tf.data.Dataset,
                 total: int | None) -> tuple[dict[str, np.ndarray], np.ndarray, tuple[str, ...]]:
    """Every step on every batch: (step name -> outputs in dataset order, labels, file names)."""
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in steps}
    labels, names = [], []
    # disable=None: a bar on a terminal, nothing in log files.
    with tqdm(total=total, desc="embed", unit="img", leave=False, disable=None) as bar:
        for images, batch_labels, batch_names in dataset:
            for name, step in steps.items():
                chunks[name].append(step(images).numpy())
            labels.append(batch_labels.numpy())
            names.extend(n.decode() for n in batch_names.numpy())
            bar.update(len(batch_labels))
    if not labels:
        raise DataError("no images to embed: the input is empty")
    outputs = {name: np.concatenate(parts).astype(np.float32) for name, parts in chunks.items()}
    return outputs, np.concatenate(labels).astype(np.int64), tuple(names)


def embed_with(step: Callable[[tf.Tensor], tf.Tensor], dataset: tf.data.Dataset,
               total: int | None = None,
               confidence: Callable[[tf.Tensor], tf.Tensor] | None = None) -> Embeddings:
    """`embed_dataset` with an `embedding_function` made once and reused.

    Args:
        step: images -> L2-normalised embeddings (`embedding_function`).
        dataset: Batches of (float32 images in [-1, 1], int labels, string file names).
        total: Number of images, for the progress bar.
        confidence: images -> confidences (`confidence_function`), or None.

    Returns:
        The embeddings in dataset order (with their confidences).
    """
    steps = {"embedding": step} if confidence is None else {"embedding": step, "confidence": confidence}
    outputs, labels, names = _run_batches(steps, dataset, total)
    return Embeddings(outputs["embedding"], labels, names, outputs.get("confidence"))


def search_time(embeddings: np.ndarray, zero_threshold: float, k: int = 10) -> dict[str, float]:
    """Times exact top-k search of every embedding against all of them with `SparseIndex`.

    Args:
        embeddings: float32 [N, D], the database and the queries.
        zero_threshold: Values at or below it in magnitude are dropped from the index.
        k: Neighbours per query.

    Returns:
        `search_ms_per_query` (one thread) and `postings_per_query`.
    """
    index = SparseIndex.from_dense(embeddings, zero_threshold=zero_threshold)
    index.search(embeddings, k, num_threads=1)
    stats = index.stats
    return {
        "search_ms_per_query": float(stats["ms_per_query"]),
        "postings_per_query": float(stats["postings_per_query"]),
    }


# Pairs scored at once by a distribution scorer: bounds the (pairs, samples, D) tensors of HIB.
SCORE_CHUNK = 2048


@dataclass(frozen=True, eq=False)
class PairInputs:
    """What verification reads of each distinct image.

    Attributes:
        embedding: float32 [N, D'], L2-normalised embeddings (the means; flip mode applied).
        parameters: float32 [N, P], the parameter vectors, for a distribution scorer; else None.
        confidence: float32 [N], each image's confidence, where the run has one; else None.
    """

    embedding: np.ndarray
    parameters: np.ndarray | None = None
    confidence: np.ndarray | None = None


class PairScoring:
    """How a run scores verification pairs (its head's test-time `scorer`) and how sure it is of each image.

    - `cosine` (every deterministic head, DUL, vMF-FL, vMF-loss): the inner
      product of the L2-normalised embeddings, with the flip mode applied.
    - `mls` (PFE, SCF, SPE) and `hib` (HIB): the scorer on the parameter
      vectors of the images as they are. A flip mode has no meaning for a
      distribution's extra parameters, so there it shapes the embeddings (and
      their sparsity and search figures) only, and the confidence is the
      unflipped image's. HIB's scorer samples: K samples of each image are
      drawn once, with a stateless seed (`train.seed`), so scores repeat.

    With a flip mode, a cosine-scored image's confidence is the smaller of its
    two views' (`confidence_function`).

    Args:
        backbone: images -> parameter vectors (or embeddings).
        config: The run config (`head.name` chooses the scorer, `model.distribution`).
        flip: Flip test-time augmentation: `none`, `sum` or `concat`.
        scorer: The scorer layer to use (the training head's HIB scorer, whose
            weights are current); None builds the run's (`restore_scorer` loads
            HIB's trained weights into it).
    """

    def __init__(self, backbone: keras.Model, config: Config, flip: str = "none",
                 scorer: keras.layers.Layer | None = None) -> None:
        from sparse_embed.distributions.scorers import build_scorer

        self.name = HEADS.get(config.head.name).scorer
        self.seed = config.train.seed
        self.distribution = config.model.distribution.build(config.model.embedding_size)
        self.steps = {"embedding": embedding_function(backbone, flip)}
        self.scorer = None
        if self.name != "cosine":
            options = {"num_samples": config.head.params.num_samples} if self.name == "hib" else {}
            self.scorer = scorer if scorer is not None else build_scorer(
                self.name, self.distribution, **options)
            self.steps["parameters"] = parameters_function(backbone)
        if self.distribution.has_confidence:
            self.steps["confidence"] = confidence_function(
                backbone, self.distribution, flip if self.scorer is None else "none")

    def restore_scorer(self, model_dir: str | os.PathLike) -> None:
        """Loads the trained weights of the scorer (HIB's scale and bias, `head/scorer/...`).

        Args:
            model_dir: The run directory; its latest checkpoint holds the head.

        Raises:
            DataError: If the scorer has weights and the checkpoint has none of them
                (a backbone-only checkpoint, such as `best/`'s).
        """
        if self.scorer is None or not self.scorer.weights:
            return
        latest = tf.train.latest_checkpoint(str(Path(model_dir) / CHECKPOINT_DIR))
        reader = tf.train.load_checkpoint(latest)
        for weight in self.scorer.weights:
            key = variable_key(f"head/scorer/{weight.name.split('/')[-1].partition(':')[0]}")
            if not reader.has_tensor(key):
                raise DataError(f"checkpoint {latest} has no {key.partition('/.')[0]}: head "
                                f"{self.name!r} scores pairs with trained weights of its head; "
                                f"evaluate a training checkpoint of the run")
            weight.assign(reader.get_tensor(key))

    def embed(self, dataset: tf.data.Dataset, total: int | None = None
              ) -> tuple[PairInputs, tuple[str, ...]]:
        """(what the pairs need of each image, the file names in dataset order).

        Args:
            dataset: Batches of (float32 images in [-1, 1], labels, string file names).
            total: Number of images, for the progress bar.
        """
        outputs, _, names = _run_batches(self.steps, dataset, total)
        return PairInputs(outputs["embedding"], outputs.get("parameters"),
                          outputs.get("confidence")), names

    def scores(self, inputs: PairInputs, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """The score of each pair (inputs[left[i]], inputs[right[i]]), float32 [P]; higher: more alike.

        Args:
            inputs: From `embed`.
            left: int [P], the first image of each pair.
            right: int [P], the second image of each pair.
        """
        if self.scorer is None:
            return _pair_scores(inputs.embedding, left, right)
        parameters = tf.constant(inputs.parameters)
        samples = None
        if hasattr(self.scorer, "num_samples"):
            samples = self.distribution.sample(parameters, (self.scorer.num_samples,),
                                               seed=tf.constant([self.seed, 0], tf.int32))
        chunks = []
        for start in range(0, len(left), SCORE_CHUNK):
            a, b = left[start:start + SCORE_CHUNK], right[start:start + SCORE_CHUNK]
            drawn = {} if samples is None else {"samples1": tf.gather(samples, a),
                                                 "samples2": tf.gather(samples, b)}
            chunks.append(self.scorer(tf.gather(parameters, a), tf.gather(parameters, b),
                                      **drawn).numpy())
        return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)


def pair_confidence(confidence: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """A pair's confidence: the smaller of its two images' confidences.

    Args:
        confidence: float [N], each image's.
        left: int [P], the first image of each pair.
        right: int [P], the second image of each pair.
    """
    return np.minimum(confidence[left], confidence[right])


def risk_coverage_errors(scores: np.ndarray, issame: np.ndarray, confidences: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray]:
    """The pairs the confidence metrics judge: (1 where misclassified, their confidences).

    A pair is misclassified at the threshold `verification_confidence_metrics`
    chooses (the best accuracy on these pairs); pairs with a non-finite score
    are left out, as there.

    Args:
        scores: float [P] pair scores.
        issame: bool [P].
        confidences: float [P] pair confidences.
    """
    threshold = verification_confidence_metrics(scores, issame)["threshold"]
    finite = np.isfinite(scores)
    wrong = (scores[finite] >= threshold) != np.asarray(issame, bool)[finite]
    return wrong.astype(np.float64), np.asarray(confidences, np.float64)[finite]


def _embed_names(scoring: PairScoring, config: Config, dataset: tf.data.Dataset,
                 names: Sequence[str]) -> PairInputs:
    """Embeds `dataset` (images called `names`); every one of them must decode."""
    inputs, produced = scoring.embed(dataset, total=len(names))
    unreadable = missing_paths(names, produced)
    if unreadable:
        raise DataError(f"{len(unreadable)} image(s) of the pairs do not decode, first: "
                        f"{unreadable[0]}; replace or re-align them")
    return inputs


def _embed_pairs(scoring: PairScoring, config: Config, pairs: Pairs
                 ) -> tuple[PairInputs, np.ndarray, np.ndarray]:
    """(what the pairs need of the distinct images, index of each left image, of each right image)."""
    paths, left, right = unique_images(pairs)
    dataset = files_dataset(list(paths), None, config.eval.batch_size, config.model.input_shape)
    return _embed_names(scoring, config, dataset, paths), left, right


def _pair_scores(emb: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    return np.sum(emb[left] * emb[right], axis=1)


def pair_results(emb: np.ndarray, left: np.ndarray, right: np.ndarray, issame: np.ndarray,
                 fold: np.ndarray, zero_threshold: float,
                 threshold_pairs: tuple[np.ndarray, np.ndarray] | None = None,
                 scores: np.ndarray | None = None, confidence: np.ndarray | None = None
                 ) -> tuple[dict[str, float | str], np.ndarray]:
    """Verification and sparsity results of the pairs (emb[left[i]], emb[right[i]]).

    Args:
        emb: float32 [N, D], L2-normalised embeddings.
        left: int [P], the first image of each pair.
        right: int [P], the second image of each pair.
        issame: bool [P].
        fold: int [P], the fold of each pair.
        zero_threshold: Values at or below it in magnitude count as zeros.
        threshold_pairs: (scores, issame) of separate pairs that choose the
            accuracy threshold; None chooses it by the folds.
        scores: float [P] pair scores of the run's scorer (`PairScoring.scores`);
            None scores with the cosine of `emb`.
        confidence: float [N] image confidences; given, the results add
            `CONFIDENCE_METRICS` of the pair confidences (`pair_confidence`).

    Returns:
        (results, scores): the results of `evaluate_verification` but the search
        timing, and the pair scores.
    """
    if scores is None:
        scores = _pair_scores(emb, left, right)
    result = verification_metrics(scores, issame, folds=fold, threshold_pairs=threshold_pairs)
    tar = result.pop("tar_at_far", {})
    result.update({f"tar@far={far:g}": value for far, value in tar.items()})
    sparsity = sparsity_stats_np(emb, zero_threshold)
    result.update(
        embedding_size=int(emb.shape[1]),
        mean_nnz=float(sparsity["nnz"]),
        flops_per_pair=float(sparsity["flops"]),
        r_sub=float(sparsity["r_sub"]),
    )
    if confidence is not None:
        measured = verification_confidence_metrics(scores, issame,
                                                   pair_confidence(confidence, left, right))
        result.update({key: measured[key] for key in CONFIDENCE_METRICS})
    return {k: v if isinstance(v, str) else float(v) for k, v in result.items()}, scores


@dataclass(frozen=True, eq=False)
class Verification:
    """The outcome of a verification protocol.

    Attributes:
        results: The flat results (`evaluate_verification`).
        scores: float [P], the pair scores.
        issame: bool [P].
        confidence: float [P], the pair confidences, where the run has them; else None.
    """

    results: dict[str, float | str]
    scores: np.ndarray
    issame: np.ndarray
    confidence: np.ndarray | None = None


def scoring_for(backbone: keras.Model, config: Config, model_dir: str | os.PathLike | None = None
                ) -> PairScoring:
    """The run's `PairScoring` with its eval flip mode, its scorer's trained weights from `model_dir`.

    Args:
        backbone: The run's backbone.
        config: The run config.
        model_dir: The run directory whose checkpoint holds the scorer's weights;
            None keeps their initial values (an untrained baseline).
    """
    scoring = PairScoring(backbone, config, config.eval.flip)
    if model_dir is not None:
        scoring.restore_scorer(model_dir)
    return scoring


def _verify(scoring: PairScoring, config: Config, inputs: PairInputs, left: np.ndarray,
            right: np.ndarray, issame: np.ndarray, fold: np.ndarray,
            threshold_pairs: Pairs | None) -> Verification:
    """Scores the pairs (left[i], right[i]) of the images `inputs` and measures them."""
    chooser = None
    if threshold_pairs is not None:
        chooser = (scoring.scores(*_embed_pairs(scoring, config, threshold_pairs)),
                   threshold_pairs.issame)
    scores = scoring.scores(inputs, left, right)
    result, scores = pair_results(inputs.embedding, left, right, issame, fold,
                                  config.sparsity.zero_threshold, chooser, scores, inputs.confidence)
    result.update(search_time(inputs.embedding, config.sparsity.zero_threshold))
    confidence = None if inputs.confidence is None else pair_confidence(inputs.confidence, left, right)
    return Verification(result, scores, np.asarray(issame, bool), confidence)


def verify_pairs(backbone: keras.Model, config: Config, pairs: Pairs,
                 threshold_pairs: Pairs | None = None, scoring: PairScoring | None = None
                 ) -> Verification:
    """`evaluate_verification`, with the pair confidences.

    Args:
        backbone: images -> parameter vectors (or embeddings).
        config: The run config.
        pairs: The verification pairs.
        threshold_pairs: Separate pairs that choose the accuracy threshold.
        scoring: How pairs are scored (`scoring_for`); None: the run's scorer with
            its weights' initial values.
    """
    scoring = scoring or scoring_for(backbone, config)
    inputs, left, right = _embed_pairs(scoring, config, pairs)
    return _verify(scoring, config, inputs, left, right, pairs.issame, pairs.fold, threshold_pairs)


def verify_bin(backbone: keras.Model, config: Config, pack: BinPack, name: str = "bin",
               threshold_pairs: Pairs | None = None, scoring: PairScoring | None = None
               ) -> Verification:
    """`evaluate_bin`, with the pair confidences.

    Args:
        backbone: images -> parameter vectors (or embeddings).
        config: The run config.
        pack: The verification pack.
        name: Prefix of the image names in error messages (the pack's file name).
        threshold_pairs: Separate pairs that choose the accuracy threshold.
        scoring: How pairs are scored (`scoring_for`); None: the run's scorer with
            its weights' initial values.
    """
    scoring = scoring or scoring_for(backbone, config)
    names = [f"{name}#{i}" for i in range(len(pack.images))]
    dataset = bytes_dataset(pack.images, names, config.eval.batch_size, config.model.input_shape)
    inputs = _embed_names(scoring, config, dataset, names)
    left = np.arange(0, len(names), 2)
    return _verify(scoring, config, inputs, left, left + 1, pack.issame, pack.fold, threshold_pairs)


def evaluate_verification(backbone: keras.Model, config: Config, pairs: Pairs,
                          threshold_pairs: Pairs | None = None, scoring: PairScoring | None = None
                          ) -> tuple[dict[str, float | str], np.ndarray]:
    """Verification, sparsity and search-time results of a backbone on a pairs protocol.

    Each distinct image of the pairs is embedded once; a pair's score is the
    run's scorer's (`PairScoring`): the cosine similarity of its two
    embeddings for a deterministic run.

    Args:
        backbone: images -> embeddings (or parameter vectors).
        config: The run config (input size, eval batch size and flip mode, zero threshold).
        pairs: The verification pairs.
        threshold_pairs: Separate pairs that choose the accuracy threshold (LFW
            View 1: `pairsDevTrain.txt`, with `pairs` from `pairsDevTest.txt`);
            None chooses it by the folds of `pairs` (see `verification_metrics`).
        scoring: How pairs are scored (`scoring_for`, with the run's trained
            scorer weights); None: the run's scorer with their initial values.

    Returns:
        (results, scores): a flat dict (accuracy, accuracy_std with 2 or more folds,
        accuracy_protocol (a sentence), threshold, auc, eer, tar@far=..., embedding_size,
        mean_nnz, flops_per_pair, r_sub, `CONFIDENCE_METRICS` where the run has a
        confidence, search_ms_per_query, postings_per_query) and the pair scores,
        for ROC plots. The sparsity and search figures are those of the images of `pairs`.

    Raises:
        DataError: If an image of the pairs does not decode.
    """
    verified = verify_pairs(backbone, config, pairs, threshold_pairs, scoring)
    return verified.results, verified.scores


def evaluate_bin(backbone: keras.Model, config: Config, pack: BinPack, name: str = "bin",
                 threshold_pairs: Pairs | None = None, scoring: PairScoring | None = None
                 ) -> tuple[dict[str, float | str], np.ndarray]:
    """`evaluate_verification` on an InsightFace `.bin` pack (pair i: images 2i, 2i + 1).

    Args:
        backbone: images -> embeddings (or parameter vectors).
        config: The run config.
        pack: The verification pack.
        name: Prefix of the image names in error messages (the pack's file name).
        threshold_pairs: Separate pairs that choose the accuracy threshold; None
            chooses it by the pack's folds.
        scoring: How pairs are scored (`scoring_for`); None: the run's scorer.

    Returns:
        (results, scores), as `evaluate_verification`.

    Raises:
        DataError: If an image of the pack or of `threshold_pairs` does not decode.
    """
    verified = verify_bin(backbone, config, pack, name, threshold_pairs, scoring)
    return verified.results, verified.scores
