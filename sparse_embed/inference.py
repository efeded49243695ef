"""From a trained model directory to embeddings, HDF5 files and verification results.

The library behind `python -m sparse_embed.embed` and `python -m sparse_embed.evaluate`.
Embeddings are L2-normalised, the form retrieval and verification use: the
inner product of two of them is their cosine similarity, and normalising keeps
every zero of a sparse embedding a zero. A probabilistic run's backbone
outputs parameter vectors `[mean | extra]`: its embedding is the normalised
mean, and `confidence_function` gives the distribution's confidence.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sparse_embed import compression
from sparse_embed.checkpoints import CHECKPOINT_DIR, checkpoint_for
from sparse_embed.config import Config, config_from_model_dir
from sparse_embed.data.embeddings import Embeddings
from sparse_embed.data.pipeline import bytes_dataset, files_dataset, missing_paths
from sparse_embed.data.verification import BinPack, Pairs, unique_images
from sparse_embed.distributions import Distribution
from sparse_embed.errors import ConfigError, DataError
from sparse_embed.keras import keras, tf
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
        ConfigError: If `model_dir` has no config.yaml.
        DataError: If it has no checkpoint.
    """
    config = config_from_model_dir(model_dir)
    keras.utils.set_random_seed(config.train.seed)
    backbone = build_backbone(config)
    if not untrained:
        latest = tf.train.latest_checkpoint(str(Path(model_dir) / CHECKPOINT_DIR))
        if latest is None:
            raise DataError(f"no checkpoint in {Path(model_dir) / CHECKPOINT_DIR}; train first")
        checkpoint_for(backbone).restore(latest).expect_partial()
        compression.after_restore(backbone)
    return backbone, config


def save_backbone(backbone: keras.Model, model_dir: str | os.PathLike, step: int) -> Path:
    """Writes a backbone-only checkpoint where `load_backbone` looks for one.

    With the run's config.yaml beside it, `model_dir` is then a model
    directory `embed`, `evaluate` and `export` read.

    Args:
        backbone: A backbone built by `build_backbone` (or restored by `load_backbone`).
        model_dir: The directory; the checkpoint goes into its checkpoints/.
        step: The training step the weights are from (the checkpoint's number).

    Returns:
        The checkpoint's path prefix.
    """
    manager = tf.train.CheckpointManager(checkpoint_for(backbone),
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

    # Any batch size, so the smaller last batch reuses the one trace.
    @tf.function(input_signature=[tf.TensorSpec([None, *size], tf.float32)])
    def step(images: tf.Tensor) -> tf.Tensor:
        e = embed(images)
        if combine is not None:
            e = combine(e, embed(tf.image.flip_left_right(images)))
        return tf.math.l2_normalize(e, axis=-1)

    return step


def confidence_function(backbone: keras.Model,
                        distribution: Distribution) -> Callable[[tf.Tensor], tf.Tensor]:
    """Returns images -> the confidence of each image's distribution (higher: surer), float32 [B].

    The confidence is the distribution's own (`Distribution.confidence`): -mean
    log sigma^2 for a Gaussian, log kappa for a vMF.

    Args:
        backbone: images -> parameter vectors, of a run whose `model.distribution`
            is `distribution` (not `dirac`, which has no confidence).
        distribution: `config.model.distribution.build(config.model.embedding_size)`.

    Raises:
        ConfigError: If the distribution has no confidence (`dirac`).
    """
    if not distribution.has_confidence:
        raise ConfigError("a dirac model (a point per image) has no confidence; train with "
                          "model.distribution.name=gaussian or vmf")
    size = backbone.input_shape[1:]

    @tf.function(input_signature=[tf.TensorSpec([None, *size], tf.float32)])
    def step(images: tf.Tensor) -> tf.Tensor:
        return tf.cast(distribution.confidence(backbone(images, training=False)), tf.float32)

    return step


def embed_dataset(backbone: keras.Model, dataset: tf.data.Dataset, flip: str = "none",
                  total: int | None = None) -> Embeddings:
    """Runs the backbone over a dataset of (image, label, filename) batches.

    Args:
        backbone: images -> embeddings.
        dataset: Batches of (float32 images in [-1, 1], int labels, string file names).
        flip: Flip test-time augmentation: `none`, `sum` or `concat`.
        total: Number of images, for the progress bar.

    Returns:
        The L2-normalised embeddings in dataset order.
    """
    return embed_with(embedding_function(backbone, flip), dataset, total)


def embed_with(step: Callable[[tf.Tensor], tf.Tensor], dataset: tf.data.Dataset,
               total: int | None = None) -> Embeddings:
    """`embed_dataset` with an `embedding_function` made once and reused.

    Args:
        step: images -> L2-normalised embeddings (`embedding_function`).
        dataset: Batches of (float32 images in [-1, 1], int labels, string file names).
        total: Number of images, for the progress bar.

    Returns:
        The embeddings in dataset order.
    """
    chunks, labels, names = [], [], []
    # disable=None: a bar on a terminal, nothing in log files.
    with tqdm(total=total, desc="embed", unit="img", leave=False, disable=None) as bar:
        for images, batch_labels, batch_names in dataset:
            chunks.append(step(images).numpy())
            labels.append(batch_labels.numpy())
            names.extend(n.decode() for n in batch_names.numpy())
            bar.update(len(batch_labels))
    if not chunks:
        raise DataError("no images to embed: the input is empty")
    return Embeddings(np.concatenate(chunks).astype(np.float32),
                      np.concatenate(labels).astype(np.int64), tuple(names))


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


def _embed_names(backbone: keras.Model, config: Config, dataset: tf.data.Dataset,
                 names: Sequence[str]) -> np.ndarray:
    """Embeds `dataset` (images called `names`); every one of them must decode."""
    embedded = embed_dataset(backbone, dataset, config.eval.flip, total=len(names))
    unreadable = missing_paths(names, embedded.filename)
    if unreadable:
        raise DataError(f"{len(unreadable)} image(s) of the pairs do not decode, first: "
                        f"{unreadable[0]}; replace or re-align them")
    return embedded.embedding


def _embed_pairs(backbone: keras.Model, config: Config, pairs: Pairs
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings of the distinct images, index of each left image, of each right image)."""
    paths, left, right = unique_images(pairs)
    dataset = files_dataset(list(paths), None, config.eval.batch_size, config.model.input_shape)
    return _embed_names(backbone, config, dataset, paths), left, right


def _pair_scores(emb: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    return np.sum(emb[left] * emb[right], axis=1)


def pair_results(emb: np.ndarray, left: np.ndarray, right: np.ndarray, issame: np.ndarray,
                 fold: np.ndarray, zero_threshold: float,
                 threshold_pairs: tuple[np.ndarray, np.ndarray] | None = None
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

    Returns:
        (results, scores): the results of `evaluate_verification` but the search
        timing, and the pair scores.
    """
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
    return {k: v if isinstance(v, str) else float(v) for k, v in result.items()}, scores


def _verify(backbone: keras.Model, config: Config, emb: np.ndarray, left: np.ndarray,
            right: np.ndarray, issame: np.ndarray, fold: np.ndarray,
            threshold_pairs: Pairs | None) -> tuple[dict[str, float | str], np.ndarray]:
    """Scores the pairs (left[i], right[i]) of embeddings `emb` and measures them."""
    chooser = None
    if threshold_pairs is not None:
        chooser = (_pair_scores(*_embed_pairs(backbone, config, threshold_pairs)),
                   threshold_pairs.issame)
    result, scores = pair_results(emb, left, right, issame, fold, config.sparsity.zero_threshold,
                                  chooser)
    result.update(search_time(emb, config.sparsity.zero_threshold))
    return result, scores


def evaluate_verification(backbone: keras.Model, config: Config, pairs: Pairs,
                          threshold_pairs: Pairs | None = None
                          ) -> tuple[dict[str, float | str], np.ndarray]:
    """Verification, sparsity and search-time results of a backbone on a pairs protocol.

    Each distinct image of the pairs is embedded once; a pair's score is the
    cosine similarity of its two embeddings.

    Args:
        backbone: images -> embeddings.
        config: The run config (input size, eval batch size and flip mode, zero threshold).
        pairs: The verification pairs.
        threshold_pairs: Separate pairs that choose the accuracy threshold (LFW
            View 1: `pairsDevTrain.txt`, with `pairs` from `pairsDevTest.txt`);
            None chooses it by the folds of `pairs` (see `verification_metrics`).

    Returns:
        (results, scores): a flat dict (accuracy, accuracy_std with 2 or more folds,
        accuracy_protocol (a sentence), threshold, auc, eer, tar@far=..., embedding_size,
        mean_nnz, flops_per_pair, r_sub, search_ms_per_query, postings_per_query) and
        the pair scores, for ROC plots. The sparsity and search figures are those
        of the images of `pairs`.

    Raises:
        DataError: If an image of the pairs does not decode.
    """
    emb, left, right = _embed_pairs(backbone, config, pairs)
    return _verify(backbone, config, emb, left, right, pairs.issame, pairs.fold, threshold_pairs)


def evaluate_bin(backbone: keras.Model, config: Config, pack: BinPack, name: str = "bin",
                 threshold_pairs: Pairs | None = None
                 ) -> tuple[dict[str, float | str], np.ndarray]:
    """`evaluate_verification` on an InsightFace `.bin` pack (pair i: images 2i, 2i + 1).

    Args:
        backbone: images -> embeddings.
        config: The run config.
        pack: The verification pack.
        name: Prefix of the image names in error messages (the pack's file name).
        threshold_pairs: Separate pairs that choose the accuracy threshold; None
            chooses it by the pack's folds.

    Returns:
        (results, scores), as `evaluate_verification`.

    Raises:
        DataError: If an image of the pack or of `threshold_pairs` does not decode.
    """
    names = [f"{name}#{i}" for i in range(len(pack.images))]
    dataset = bytes_dataset(pack.images, names, config.eval.batch_size, config.model.input_shape)
    emb = _embed_names(backbone, config, dataset, names)
    left = np.arange(0, len(names), 2)
    return _verify(backbone, config, emb, left, left + 1, pack.issame, pack.fold, threshold_pairs)
