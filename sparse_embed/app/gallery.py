"""The gallery: enrolled people, their embeddings in the suite's index, the model and the threshold.

A gallery is a directory in a plain format (JSON, the index's own files,
`.npy`; never pickle):

    GALLERY/gallery.json              {"format", "version", "state": "state-<token>"}
    GALLERY/state-<token>/manifest.json
                                      model (fingerprint, path, MTCNN directory, input size,
                                      embedding size, flip mode, index type), threshold,
                                      calibration, people (name, id, images)
    GALLERY/state-<token>/index/      MutableIndex (sparse models) or DenseIndex (dense ones)
    GALLERY/state-<token>/rows.npy    int64 [N, 2]: (index row id, person id) of every embedding
    GALLERY/state-<token>/calibration.npy   float64 [m, 3]: threshold, FAR, TAR by decreasing
                                      threshold (only once calibrated)
    GALLERY/state-<token>/impostors.npy     float64 [n]: the different pairs' scores, sorted
    GALLERY/state-<token>/rerank.npy  with --rerank_model: float32 [R, Dd], the dense model's
                                      vector of each row id (zeros for removed rows)
    GALLERY/state-<token>/means/      with --keep_means: each person's normalised mean embedding
                                      (index/, of the gallery's index type, caller id = person id)
                                      and float64 sums (sums.npy [M, D], people.npy [M])

Every change writes a complete new state directory beside the current one,
then replaces `gallery.json` (a rename) to point at it, then deletes the old
state: a crash at any moment leaves `gallery.json` naming a complete state, so
the gallery always loads, as before the change or after it, never with half
of an enrolment; a reader that opened the old state keeps reading it.

A gallery records its model's fingerprint (`sparse_embed.app.embedder`) and
refuses embeddings of any other model: a score between embeddings of two
models means nothing.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sparse_embed.app.store import DenseIndex
from sparse_embed.errors import ConfigError, DataError
from sparse_embed.fileio import atomic_path
from sparse_embed.search.mutable import MutableIndex

FORMAT = "sparse-embed-gallery"
VERSION = 1
POINTER_NAME = "gallery.json"
MANIFEST_NAME = "manifest.json"
INDEX_DIR = "index"
ROWS_NAME = "rows.npy"
CURVE_NAME = "calibration.npy"
IMPOSTORS_NAME = "impostors.npy"
STATE_PREFIX = "state-"
# The cosine threshold of a gallery not calibrated yet (`calibrate` replaces it): a placeholder,
# reported as uncalibrated, with no false-accept rate.
DEFAULT_THRESHOLD = 0.5
INDEX_TYPES = {"sparse": MutableIndex, "dense": DenseIndex}
MEANS_DIR = "means"
RERANK_NAME = "rerank.npy"
# Rows per face re-scored with a gallery's dense vectors (more when more rows are asked for).
RERANK_K = 100
SUMS_NAME = "sums.npy"
SUM_PEOPLE_NAME = "people.npy"
# How a person's score comes from the scores of their embeddings: the best, the mean of the best
# few, or the score of their mean embedding (a gallery that keeps means).
MATCHING = ("best", "mean", "centroid")
DEFAULT_MEAN_OF = 3
# Index rows scored per face before grouping by person; a larger gallery ranks people by
# their rows among these (exact while the gallery holds no more rows).
MAX_CANDIDATES = 10000
# Characters of a fingerprint shown in messages.
SHOWN_FINGERPRINT = 16
# Rows a sparse gallery's delta segment may hold at a save before it is merged into the base: every
# `add` rebuilds the delta, so an unmerged large delta makes each later enrol as slow as a rebuild.
COMPACT_DELTA_ROWS = 1024


@dataclass(frozen=True)
class ModelRecord:
    """The model a gallery's embeddings come from.

    Attributes:
        fingerprint: SHA-256 of its weights and embedding configuration.
        model: The run directory or `.tflite` file it was enrolled with.
        mtcnn: The TFLite MTCNN directory used for detection, or None (the `mtcnn` package).
        width: Model input width.
        height: Model input height.
        embedding_size: Embedding dimension.
        flip: Flip mode.
        index_type: `sparse` (MutableIndex) or `dense` (DenseIndex).
    """

    fingerprint: str
    model: str
    mtcnn: str | None
    width: int
    height: int
    embedding_size: int
    flip: str
    index_type: str


@dataclass(frozen=True)
class RerankRecord:
    """The dense model whose vectors re-rank a sparse gallery's candidates (`--rerank_model`).

    Attributes:
        fingerprint: SHA-256 of its weights and embedding configuration.
        model: The run directory or `.tflite` file.
        embedding_size: Dimension of its embeddings.
        flip: Its flip mode.
    """

    fingerprint: str
    model: str
    embedding_size: int
    flip: str


@dataclass(frozen=True, eq=False)
class Calibration:
    """The threshold chosen at a false-accept rate on verification pairs, and the curve it came from.

    Attributes:
        far_target: The false-accept rate asked for.
        threshold: The lowest threshold whose FAR on the pairs is at most `far_target`
            (a face matches when its score is above it).
        far: The FAR on the pairs at `threshold`.
        tar: The true-accept rate on the pairs at `threshold`.
        pairs: The pairs file.
        same_pairs: Pairs of one identity scored.
        different_pairs: Pairs of two identities scored.
        skipped_pairs: Pairs left out (an image with no face or several).
        curve: float64 [m, 3]: threshold, FAR, TAR, by decreasing threshold.
        impostors: float64 [different_pairs]: the different pairs' scores, increasing.
    """

    far_target: float
    threshold: float
    far: float
    tar: float
    pairs: str
    same_pairs: int
    different_pairs: int
    skipped_pairs: int
    curve: np.ndarray
    impostors: np.ndarray

    def far_of(self, scores: Any) -> np.ndarray:
        """The false-accept rate of each score: the FAR of the lowest threshold that accepts it.

        That is the fraction of the calibration's different pairs scoring at
        least as high; 1.0 below every different pair's score.

        Args:
            scores: float scores.
        """
        below = np.searchsorted(self.impostors, np.asarray(scores, np.float64), side="left")
        return (len(self.impostors) - below) / len(self.impostors)

    def summary(self) -> dict[str, Any]:
        """The manifest's record of the calibration (the curve is in `CURVE_NAME`)."""
        return {key: value for key, value in asdict(self).items() if key not in ("curve", "impostors")}


def calibration_from_scores(scores: np.ndarray, issame: np.ndarray, far_target: float, pairs: str,
                            skipped: int = 0) -> Calibration:
    """The threshold at `far_target` on scored verification pairs.

    Args:
        scores: float [n] pair scores (cosines).
        issame: bool [n].
        far_target: The false-accept rate wanted, in (0, 1].
        pairs: The pairs file, for the record.
        skipped: Pairs left out, for the record.

    Raises:
        ConfigError: If far_target is outside (0, 1].
        DataError: If the pairs hold no same or no different pair.
    """
    from sparse_embed.metrics.verification import roc_curve

    if not 0 < far_target <= 1:
        raise ConfigError(f"--far must lie in (0, 1], got {far_target}")
    far, tar, thresholds = roc_curve(scores, issame)
    # FAR rises as the threshold falls: the admissible thresholds are a prefix.
    k = int(np.flatnonzero(far <= far_target + 1e-12).max())
    issame = np.asarray(issame, bool)
    return Calibration(float(far_target), float(thresholds[k]), float(far[k]), float(tar[k]), str(pairs),
                       int(issame.sum()), int((~issame).sum()), int(skipped),
                       np.stack([thresholds, far, tar], axis=1).astype(np.float64),
                       np.sort(np.asarray(scores, np.float64)[~issame]))


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


class PersonMeans:
    """Each person's mean embedding, L2-normalised, kept current as embeddings come and go.

    The normalised mean of a person's embeddings is their normalised sum (the
    count cancels), so this keeps each person's sum in float64 (exact over any
    number of incremental enrolments) and the normalised sums in an index of
    the gallery's kind whose caller ids are person ids, which
    `--matching=centroid` searches. The index is brought up to date (`sync`)
    before a search and a save, once per batch of changes.

    Args:
        index: The means' index (MutableIndex or DenseIndex), caller id = person id.
        sums: Person id -> float64 [D] sum of their embeddings.
    """

    def __init__(self, index: MutableIndex | DenseIndex, sums: dict[int, np.ndarray]) -> None:
        self.index = index
        self.sums = sums
        self._stale: set[int] = set()

    @classmethod
    def empty(cls, index_type: str, dim: int) -> PersonMeans:
        """No person yet.

        Args:
            index_type: The gallery's index type (`INDEX_TYPES`).
            dim: The embedding dimension.
        """
        return cls(INDEX_TYPES[index_type](dim), {})

    def add(self, person: int, embeddings: np.ndarray) -> None:
        """Adds a person's new embeddings to their sum (a new person starts at zero).

        Args:
            person: The person's id.
            embeddings: float [n, D].
        """
        total = np.asarray(embeddings, np.float64).sum(axis=0)
        self.sums[person] = self.sums[person] + total if person in self.sums else total
        self._stale.add(person)

    def drop(self, person: int) -> None:
        """Forgets a removed person."""
        self.sums.pop(person, None)
        self._stale.add(person)

    def mean(self, person: int) -> np.ndarray:
        """float32 [D]: the person's normalised mean embedding."""
        return _unit(self.sums[person][None])[0]

    def sync(self) -> None:
        """Writes the changed people's means into the index (removing the removed people's)."""
        if not self._stale:
            return
        stale = np.array(sorted(self._stale), np.int64)
        self.index.remove(stale[np.isin(stale, self.index.ids)])
        kept = np.array([person for person in stale if person in self.sums], np.int64)
        if len(kept):
            self.index.add(_unit(np.stack([self.sums[int(person)] for person in kept])), ids=kept)
        self._stale.clear()

    def save(self, directory: Path) -> None:
        """Writes the index and the sums into the new directory `directory`."""
        self.sync()
        directory.mkdir()
        if isinstance(self.index, MutableIndex) and self.index.stats["delta_rows"] > COMPACT_DELTA_ROWS:
            self.index.compact()
        self.index.save(directory / INDEX_DIR)
        people = np.array(sorted(self.sums), np.int64)
        _save_npy(directory / SUM_PEOPLE_NAME, people)
        _save_npy(directory / SUMS_NAME, np.stack([self.sums[int(person)] for person in people])
                  if len(people) else np.zeros((0, self.index.dim)))

    @classmethod
    def load(cls, directory: Path, index_type: str) -> PersonMeans:
        """Reads what `save` wrote.

        Args:
            directory: The state's means directory.
            index_type: The gallery's index type.
        """
        index = INDEX_TYPES[index_type].load(directory / INDEX_DIR)
        people = np.load(directory / SUM_PEOPLE_NAME, allow_pickle=False)
        sums = np.load(directory / SUMS_NAME, allow_pickle=False)
        return cls(index, dict(zip(people.tolist(), sums, strict=True)))


def _unit(rows: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.maximum(norm, 1e-12)).astype(np.float32)


def short(fingerprint: str) -> str:
    """A fingerprint as messages show it."""
    return fingerprint[:SHOWN_FINGERPRINT]


class Gallery:
    """A gallery in memory; `save` writes it back as a new state, atomically.

    Use `Gallery.create` for a new gallery and `Gallery.load` for an existing one.

    Args:
        directory: The gallery directory.
        model: The model record.
        index: The embeddings (MutableIndex or DenseIndex).
        rows: int64 [N, 2] (row id, person id).
        people: Name -> {"id": person id, "images": enrolled image names}.
        threshold: Score above which a face matches a person.
        calibration: The calibration that chose `threshold`, or None.
        next_person: The id the next new person gets.
        means: Each person's mean embedding (`--keep_means`), or None when the gallery keeps none.
        rerank: The dense model that re-ranks (`--rerank_model`), or None.
        dense: float32 [R, rerank.embedding_size], its vector of each row id (with `rerank`).
    """

    def __init__(self, directory: str | os.PathLike, model: ModelRecord, index: MutableIndex | DenseIndex,
                 rows: np.ndarray, people: dict[str, dict[str, Any]], threshold: float = DEFAULT_THRESHOLD,
                 calibration: Calibration | None = None, next_person: int = 0,
                 means: PersonMeans | None = None, rerank: RerankRecord | None = None,
                 dense: np.ndarray | None = None) -> None:
        self.directory = Path(directory)
        self.model = model
        self.index = index
        self.rows = np.asarray(rows, np.int64).reshape(-1, 2)
        self.people = people
        self.threshold = float(threshold)
        self.calibration = calibration
        self.next_person = int(next_person)
        self.means = means
        self.rerank = rerank
        self.dense = None
        if rerank is not None:
            self.dense = (np.zeros((0, rerank.embedding_size), np.float32) if dense is None
                          else np.asarray(dense, np.float32))
        # The matching tables of `_matching_tables`, with the rows array they were derived from.
        self._tables: tuple[np.ndarray, tuple[list[str], np.ndarray, np.ndarray, np.ndarray]] | None = None

    # Opening -------------------------------------------------------------------

    @staticmethod
    def exists(directory: str | os.PathLike) -> bool:
        """Whether `directory` holds a gallery."""
        return (Path(directory) / POINTER_NAME).is_file()

    @classmethod
    def create(cls, directory: str | os.PathLike, model: ModelRecord, keep_means: bool = False,
               rerank: RerankRecord | None = None) -> Gallery:
        """A new, empty gallery (written by the first `save`).

        Args:
            directory: The gallery directory (new or empty).
            model: The model record.
            keep_means: Whether it also keeps each person's mean embedding (`PersonMeans`).
            rerank: The dense model whose vectors it keeps to re-rank a sparse index's candidates;
                None: none. Embeddings given to the gallery are then the model's followed by the
                dense model's (`split`).

        Raises:
            DataError: If `directory` is a file or a non-empty directory that is not a gallery.
            ConfigError: On an unknown index type, a re-rank model for a dense index, or a re-rank
                model with `keep_means`.
        """
        folder = Path(directory)
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise DataError(f"{folder} exists and is not a gallery; pass a new or empty directory")
        if model.index_type not in INDEX_TYPES:
            raise ConfigError(f"index type must be one of {', '.join(INDEX_TYPES)}, got {model.index_type!r}")
        if rerank is not None and model.index_type != "sparse":
            raise ConfigError("--rerank_model re-ranks the candidates of a sparse index; this gallery's "
                              "index is dense (exact already)")
        if rerank is not None and keep_means:
            raise ConfigError("--keep_means and --rerank_model do not go together: person means are kept of "
                              "the sparse embeddings only")
        means = PersonMeans.empty(model.index_type, model.embedding_size) if keep_means else None
        return cls(folder, model, INDEX_TYPES[model.index_type](model.embedding_size), np.zeros((0, 2)), {},
                   means=means, rerank=rerank)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Gallery:
        """Opens the gallery's current state.

        Raises:
            DataError: If `directory` holds no gallery, or its current state does not read.
        """
        folder = Path(directory)
        pointer = folder / POINTER_NAME
        if not pointer.is_file():
            raise DataError(f"{folder} is not a gallery (no {POINTER_NAME}); create one with "
                            f"python -m sparse_embed.app enroll --gallery={folder} --model=...")
        try:
            head = json.loads(pointer.read_text())
            state = folder / head["state"]
            manifest = json.loads((state / MANIFEST_NAME).read_text())
            rows = np.load(state / ROWS_NAME, allow_pickle=False)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{folder}: the gallery does not read ({e})") from None
        if head.get("format") != FORMAT or head.get("version") != VERSION:
            raise DataError(f"{pointer} is not a version-{VERSION} {FORMAT} file")
        model = ModelRecord(**manifest["model"])
        index = INDEX_TYPES[model.index_type].load(state / INDEX_DIR)
        calibration = None
        if manifest.get("calibration"):
            calibration = Calibration(**manifest["calibration"],
                                      curve=np.load(state / CURVE_NAME, allow_pickle=False),
                                      impostors=np.load(state / IMPOSTORS_NAME, allow_pickle=False))
        means = rerank = dense = None
        if manifest.get("means"):
            means = PersonMeans.load(state / manifest["means"], model.index_type)
        if manifest.get("rerank"):
            rerank = RerankRecord(**manifest["rerank"])
            dense = np.load(state / RERANK_NAME, allow_pickle=False)
        people = {p["name"]: {"id": p["id"], "images": list(p["images"])} for p in manifest["people"]}
        return cls(folder, model, index, rows, people, manifest["threshold"], calibration,
                   manifest["next_person"], means, rerank, dense)

    def check_model(self, fingerprint: str, model: str) -> None:
        """Refuses embeddings of a model other than the gallery's.

        Args:
            fingerprint: The other model's fingerprint.
            model: The other model, for the message.

        Raises:
            ConfigError: If the fingerprints differ (one line naming both).
        """
        if fingerprint != self.model.fingerprint:
            raise ConfigError(
                f"gallery {self.directory} was made with model {self.model.model} (fingerprint "
                f"{short(self.model.fingerprint)}), not with {model} (fingerprint {short(fingerprint)}); "
                "use the gallery's model, or enrol into a new gallery")

    # Changes (in memory until `save`) -------------------------------------------

    def enroll(self, name: str, embeddings: np.ndarray, images: list[str]) -> None:
        """Adds a person's embeddings (a new person, or more of an enrolled one).

        Args:
            name: The person's name.
            embeddings: float32 [n, embedding_size], L2-normalised (with a re-rank model, each
                row followed by the dense model's, as `split` reads them).
            images: The image of each embedding, for the record.

        Raises:
            ConfigError: If the name is empty.
        """
        if not name.strip():
            raise ConfigError("a person's name must not be empty")
        person = self.people.setdefault(name, {"id": self.next_person, "images": []})
        if person["id"] == self.next_person:
            self.next_person += 1
        sparse, dense = self.split(embeddings)
        ids = self.index.add(sparse)
        if dense is not None and len(ids):
            if int(ids.max()) >= len(self.dense):
                grow = np.zeros((int(ids.max()) + 1 - len(self.dense), self.dense.shape[1]), np.float32)
                self.dense = np.concatenate([self.dense, grow])
            self.dense[ids] = dense
        self.rows = np.concatenate([self.rows, np.stack([ids, np.full(len(ids), person["id"])], axis=1)])
        person["images"] += list(images)
        if self.means is not None:
            self.means.add(person["id"], sparse)

    def remove(self, name: str) -> int:
        """Removes a person and every embedding of theirs.

        Returns:
            How many embeddings were removed.

        Raises:
            DataError: If nobody of that name is enrolled.
        """
        if name not in self.people:
            known = ", ".join(sorted(self.people)[:10]) or "nobody"
            raise DataError(f"no person {name!r} in gallery {self.directory} (enrolled: {known})")
        person = self.people.pop(name)
        mine = self.rows[:, 1] == person["id"]
        self.index.remove(self.rows[mine, 0])
        if self.dense is not None:
            # A removed person's vectors do not stay behind in the dense store.
            self.dense[self.rows[mine, 0]] = 0.0
        self.rows = self.rows[~mine]
        if self.means is not None:
            self.means.drop(person["id"])
        return int(mine.sum())

    def calibrate(self, calibration: Calibration) -> None:
        """Sets the threshold to the calibration's."""
        self.calibration = calibration
        self.threshold = calibration.threshold

    def split(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """A face's vectors as the gallery takes them: (the model's embedding, the re-rank model's or
        None). With a re-rank model each row is the two concatenated (`RerankEmbedder`).

        Args:
            embeddings: float [n, embedding_size (+ the re-rank model's)].

        Raises:
            ValueError: If the width is not the gallery's.
        """
        e = np.asarray(embeddings, np.float32)
        size = self.model.embedding_size
        width = size + (self.rerank.embedding_size if self.rerank is not None else 0)
        if e.ndim != 2 or e.shape[1] != width:
            raise ValueError(f"embeddings must have shape [n, {width}], got {list(e.shape)}")
        return e[:, :size], (e[:, size:] if self.rerank is not None else None)

    def pair_scores(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """float32 [n]: the score the gallery gives each pair (a[i], b[i]): the re-rank model's
        cosine with one, else the model's.

        Args:
            a: float [n, ...] faces' vectors, as `split` reads them.
            b: float [n, ...] the other faces'.
        """
        (sparse_a, dense_a), (sparse_b, dense_b) = self.split(a), self.split(b)
        if dense_a is not None:
            return np.sum(dense_a * dense_b, axis=1)
        return np.sum(sparse_a * sparse_b, axis=1)

    def counts(self) -> dict[str, int]:
        """Name -> embeddings enrolled, by name."""
        ids, counts = np.unique(self.rows[:, 1], return_counts=True)
        by_id = dict(zip(ids.tolist(), counts.tolist(), strict=True))
        return {name: int(by_id.get(p["id"], 0)) for name, p in sorted(self.people.items())}

    # Matching ------------------------------------------------------------------

    def person_scores(self, queries: np.ndarray, matching: str = "best", mean_of: int = DEFAULT_MEAN_OF,
                      candidates: int | None = None) -> tuple[list[str], np.ndarray]:
        """Every query's score against every enrolled person.

        A person's score is the best score of their embeddings (`best`), the
        mean of their `mean_of` best (`mean`; fewer if they have fewer), or the
        score of their normalised mean embedding (`centroid`, a gallery that
        keeps means). Rows beyond the `MAX_CANDIDATES` best of a query count as
        0 in a sparse gallery (the score of an embedding sharing no dimension
        with the query) and as -1 in a dense one.

        With a re-rank model, each query's `RERANK_K` best rows by the model's
        score (or as many as asked) are re-scored by the re-rank model's: the
        scores are its cosines, and rows beyond count as -1.

        Args:
            queries: float32 [Q, embedding_size], L2-normalised (with a re-rank model, followed by
                its embeddings, as `split` reads them).
            matching: One of `MATCHING`.
            mean_of: Embeddings averaged per person with `mean`.
            candidates: Index rows scored per query (with `centroid`: people); None:
                `MAX_CANDIDATES`. People without a row among them get the floor score.

        Returns:
            (names, scores float32 [Q, P]), names in enrolment order.

        Raises:
            ConfigError: On an unknown matching, `mean_of` < 1, or `centroid` in a gallery
                without means.
        """
        if matching not in MATCHING:
            raise ConfigError(f"matching must be one of {', '.join(MATCHING)}, got {matching!r}")
        if mean_of < 1:
            raise ConfigError(f"--mean_of must be >= 1, got {mean_of}")
        self.check_matching(matching)
        queries, dense_queries = self.split(queries)
        if not self.people or not len(self.rows) or not len(queries):
            order = sorted(self.people, key=lambda n: self.people[n]["id"])
            return order, np.zeros((len(queries), len(order)), np.float32)
        order, owner, per_person, column_of = self._matching_tables()
        floor = 0.0 if self.model.index_type == "sparse" and self.rerank is None else -1.0
        if matching == "centroid":
            return order, self._centroid_scores(queries, column_of, len(order), candidates, floor)
        k = min(len(self.rows), MAX_CANDIDATES if candidates is None else max(int(candidates), 1))
        if dense_queries is not None:
            ids, scores = self.index.search(queries, k, rerank=(self.dense, dense_queries),
                                            rerank_k=max(k, RERANK_K))
        else:
            ids, scores = self.index.search(queries, k)
        q = np.repeat(np.arange(len(queries)), ids.shape[1])
        p = np.where(ids.ravel() >= 0, owner[np.maximum(ids.ravel(), 0)], -1)
        s = scores.ravel().astype(np.float64)
        keep = p >= 0
        q, p, s = q[keep], p[keep], s[keep]
        take = per_person if matching == "best" else np.minimum(per_person, mean_of)
        # Rank of each candidate among its (query, person) group, best first.
        sort = np.lexsort((-s, p, q))
        q, p, s = q[sort], p[sort], s[sort]
        key = q * len(order) + p
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        rank = np.arange(len(key)) - np.repeat(starts, np.diff(np.r_[starts, len(key)]))
        if matching == "best":
            out = np.full((len(queries), len(order)), floor)
            first = rank == 0
            out[q[first], p[first]] = s[first]
        else:
            used = rank < take[p]
            total = np.zeros((len(queries), len(order)))
            np.add.at(total, (q[used], p[used]), s[used])
            seen = np.zeros((len(queries), len(order)))
            np.add.at(seen, (q[used], p[used]), 1)
            out = (total + (take[None, :] - seen) * floor) / np.maximum(take[None, :], 1)
        return order, out.astype(np.float32)

    def check_matching(self, matching: str) -> None:
        """Refuses `centroid` matching in a gallery that keeps no means.

        Args:
            matching: One of `MATCHING`.

        Raises:
            ConfigError: If the matching needs what the gallery does not keep.
        """
        if matching == "centroid" and self.means is None:
            raise ConfigError(f"--matching=centroid needs each person's mean embedding, which gallery "
                              f"{self.directory} does not keep: enrol a new gallery with --keep_means")

    def _centroid_scores(self, queries: np.ndarray, column_of: np.ndarray, people: int,
                         candidates: int | None, floor: float) -> np.ndarray:
        """float32 [Q, people]: each query's score against each person's mean embedding, the
        `candidates` best people per query searched in the means' index, the others `floor`."""
        self.means.sync()
        out = np.full((len(queries), people), floor, np.float32)
        k = min(len(self.means.index), MAX_CANDIDATES if candidates is None else max(int(candidates), 1))
        if not k:
            return out
        ids, scores = self.means.index.search(queries, k)
        known = (ids >= 0) & (ids < len(column_of))
        column = np.where(known, column_of[np.clip(ids, 0, len(column_of) - 1)], -1)
        q, slot = np.nonzero(column >= 0)
        out[q, column[q, slot]] = scores[q, slot]
        return out

    def _matching_tables(self) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """(names in enrolment order, the column of each row id (-1: none), rows per person by
        column, the column of each person id), derived once per state of the gallery: every
        change replaces `rows`, and a Python pass over a million people would cost more than the
        search itself."""
        if self._tables is not None and self._tables[0] is self.rows:
            return self._tables[1]
        order = sorted(self.people, key=lambda n: self.people[n]["id"])
        person_ids = np.array([self.people[n]["id"] for n in order], np.int64)
        column_of = np.full(int(max(person_ids.max(), self.rows[:, 1].max())) + 1, -1, np.int64)
        column_of[person_ids] = np.arange(len(order))
        owner = np.full(int(self.rows[:, 0].max()) + 1, -1, np.int64)
        owner[self.rows[:, 0]] = column_of[self.rows[:, 1]]
        per_person = np.bincount(self.rows[:, 1], minlength=len(column_of))[person_ids]
        self._tables = (self.rows, (order, owner, per_person, column_of))
        return self._tables[1]

    def most_rows_per_person(self) -> int:
        """The most embeddings any one person has (0 in an empty gallery)."""
        if not self.people or not len(self.rows):
            return 0
        return int(self._matching_tables()[2].max())

    # Persistence ---------------------------------------------------------------

    def manifest(self) -> dict[str, Any]:
        """The manifest `save` writes."""
        people = [{"name": name, "id": p["id"], "images": p["images"]}
                  for name, p in sorted(self.people.items(), key=lambda item: item[1]["id"])]
        return {"format": FORMAT, "version": VERSION, "model": asdict(self.model),
                "threshold": self.threshold,
                "calibration": None if self.calibration is None else self.calibration.summary(),
                "people": people, "next_person": self.next_person, "index": INDEX_DIR, "rows": ROWS_NAME,
                "means": None if self.means is None else MEANS_DIR,
                "rerank": None if self.rerank is None else asdict(self.rerank)}

    def _write_state(self, state: Path) -> None:
        """Writes the complete state into the new directory `state`."""
        state.mkdir()
        self.index.save(state / INDEX_DIR)
        _save_npy(state / ROWS_NAME, self.rows)
        if self.means is not None:
            self.means.save(state / MEANS_DIR)
        if self.dense is not None:
            _save_npy(state / RERANK_NAME, self.dense)
        if self.calibration is not None:
            _save_npy(state / CURVE_NAME, self.calibration.curve)
            _save_npy(state / IMPOSTORS_NAME, self.calibration.impostors)
        _fsync_write(state / MANIFEST_NAME, json.dumps(self.manifest(), indent=1))

    def save(self) -> None:
        """Writes the gallery as a new state and points `gallery.json` at it; removes the old state.

        A failure before the pointer is replaced leaves the previous state
        current (and removes the partial new one); a crash leaves at most an
        unreferenced state directory, deleted by the next `save`.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        if isinstance(self.index, MutableIndex) and self.index.stats["delta_rows"] > COMPACT_DELTA_ROWS:
            self.index.compact()
        state = self.directory / f"{STATE_PREFIX}{secrets.token_hex(6)}"
        try:
            self._write_state(state)
        except BaseException:
            shutil.rmtree(state, ignore_errors=True)
            raise
        with atomic_path(self.directory / POINTER_NAME) as tmp:
            _fsync_write(tmp, json.dumps({"format": FORMAT, "version": VERSION, "state": state.name}))
        for stale in self.directory.glob(f"{STATE_PREFIX}*"):
            if stale.name != state.name:
                shutil.rmtree(stale, ignore_errors=True)
