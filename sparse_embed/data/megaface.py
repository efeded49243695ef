"""MegaFace challenge 1: the devkit's image lists, the published noise lists, aligned images, protocols.

    python preprocessing/prepare_megaface.py --megaface_root=FlickrFinal2 --facescrub_root=facescrub \
        --devkit=devkit/templatelists --size=1000000 --set=1 --noises=NOISES --output=data/megaface
    python -m sparse_embed.embed --model_dir=RUN --manifest=data/megaface/megaface.tsv \
        --output=megaface_RUN.hdf5
    python -m sparse_embed.data.megaface split-bins --protocol=facescrub \
        --megaface=megaface_RUN.hdf5 --facescrub=facescrub_RUN.hdf5 --output=data/megaface

Devkit lists (`templatelists/` of the MegaFace devkit): `megaface_features_list.json_<size>_<set>`
(sizes 10 .. 1000000, sets 1, 2, ...) names the distractors, `facescrub_features_list.json` the
probes. Each is a JSON object with two parallel lists: `path` (the image, relative to the
MegaFace `FlickrFinal2` folder or to the FaceScrub image folder) and `id` (one value per image).
An image's identity is its `id` in the FaceScrub list (the devkit groups probes by it) and its
folder (the Flickr user, `<prefix>/<user>@N00/`) in the MegaFace list.

Noise lists (InsightFace's cleaning of MegaFace): `megaface_noises.txt` lists distractor images
that show a FaceScrub identity, one per line as the last three components of its path
(`<prefix>/<user>/<file>`), optionally after a tab-separated index; `facescrub_noises.txt`
lists mislabelled probes by file name (`Aaron_Eckhart_123.png`). In both, lines that start
with `#` are comments. A FaceScrub entry matches a listed image whose file name has the same
stem once spaces are written as underscores (the devkit's names keep the spaces). Listed noise
images are left out of the manifests, and counted.

Alignment (`align_images`): a MegaFace image's `.jpg.json` gives its face box; the MTCNN
detection overlapping it is aligned, or the file's eyes and nose where none does. An image
without one that already has the crop's size is kept as it is (InsightFace's MegaFace package
ships both sets aligned at 112x112); any other is detected. Images with no face are counted
and named, not fatal.

Output of `prepare`: `<output>/<set>/<listed path, as .jpg>` (aligned crops) and one manifest
per set, `<output>/<set>.tsv`, tab-separated with a header line:

    path        the aligned image, relative to the manifest's folder
    label       identity index within the set (identities sorted by name)
    identity    the identity's name (FaceScrub `id`, or the MegaFace user folder)
    index       the image's position in the devkit list
    set         `megaface` or `facescrub`

`python -m sparse_embed.embed --manifest=<set>.tsv` embeds a manifest into the HDF5 files the
protocols read (`megaface_<run>.hdf5`, `facescrub_<run>.hdf5`).

Protocols (`query_database_split`), over the rows of the two HDF5 files taken together:

    facescrub   MegaFace challenge 1 (`runfacescrub`). The database is every MegaFace row.
                The queries are the FaceScrub rows whose identity has at least two rows; each
                query's gallery is the other rows of its identity. A trial is a (query, gallery
                row) pair: the gallery row is added to the database alone and ranked among the
                distractors. An identity of n rows gives n (n - 1) trials.
    megaface    The original sparse-embed `runmegaface`: queries drawn from the MegaFace
                identities themselves. Of the identities with at least two MegaFace rows,
                `num_queries` are drawn (seeded), one row of each becomes a query; the database
                is every other MegaFace row, so each query's identity stays in it. One trial
                per query: its best-scoring identity row in the database. FaceScrub rows are
                not used.

Rank of a trial: 1 + the number of database rows of other identities scoring strictly higher
(inner product) than its match. `split_bins` writes a split as the `.bin` pair the search
binary reads (queries, database; see search/Makefile): FaceScrub distractor rows carry label -1
there, as no FaceScrub query can match them.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from sparse_embed.errors import ConfigError, DataError
from sparse_embed.fileio import atomic_path
from sparse_embed.registry import Registry

if TYPE_CHECKING:
    from sparse_embed.faces.detect import FaceDetector

SETS = ("megaface", "facescrub")
SIZES = (10, 100, 1000, 10000, 100000, 1000000)
PROBE_LIST = "facescrub_features_list.json"
NOISE_FILES = {"megaface": "megaface_noises.txt", "facescrub": "facescrub_noises.txt"}
MANIFEST_COLUMNS = ("path", "label", "identity", "index", "set")
# How many missing or failed images the summary names; the rest are only counted.
SHOWN_EXAMPLES = 5
# Queries the search binary takes from one file by default (search/cli.cpp), and so `megaface`'s.
DEFAULT_NUM_QUERIES = 10000
# Database rows scored against all queries at once by `rank1`.
_SCORE_CHUNK_ROWS = 4096


def distractor_list_name(size: int, set_index: int) -> str:
    """The devkit file name of a distractor list, e.g. `megaface_features_list.json_1000000_1`.

    Args:
        size: Distractor count, one of SIZES.
        set_index: The devkit's random set (1-based).

    Raises:
        ConfigError: If `size` is not a devkit size or `set_index` is below 1.
    """
    if size not in SIZES:
        raise ConfigError(f"--size must be one of {', '.join(map(str, SIZES))}, got {size}")
    if set_index < 1:
        raise ConfigError(f"--set must be >= 1, got {set_index}")
    return f"megaface_features_list.json_{size}_{set_index}"


@dataclass(frozen=True)
class FeatureList:
    """One devkit image list.

    Attributes:
        source: The list file.
        paths: Image paths as listed (relative to the set's image root).
        ids: The `id` of each image, as text.
    """

    source: Path
    paths: tuple[str, ...]
    ids: tuple[str, ...]


def find_list(devkit: str | os.PathLike, name: str) -> Path:
    """Locates a devkit list in `devkit` or in its `templatelists/` folder.

    Args:
        devkit: The devkit folder or its `templatelists/` folder.
        name: The list's file name.

    Raises:
        DataError: If neither place holds it.
    """
    devkit = Path(devkit)
    for candidate in (devkit / name, devkit / "templatelists" / name):
        if candidate.is_file():
            return candidate
    raise DataError(f"devkit list {name} not found in {devkit} or {devkit / 'templatelists'}; "
                    f"--devkit must be the MegaFace devkit (or its templatelists folder)")


def read_feature_list(path: str | os.PathLike) -> FeatureList:
    """Reads a devkit list: a JSON object with parallel `path` and `id` lists.

    Args:
        path: The list file.

    Raises:
        DataError: If it is missing, not JSON, or not that object.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"devkit list {path} not found")
    hint = "expected the devkit's {\"path\": [...], \"id\": [...]}"
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not JSON ({' '.join(str(e).split())}); {hint}") from None
    if not isinstance(data, dict) or not isinstance(data.get("path"), list):
        raise DataError(f"{path} has no 'path' list; {hint}")
    paths, ids = data["path"], data.get("id")
    if not isinstance(ids, list) or len(ids) != len(paths):
        raise DataError(f"{path}: 'id' must be a list with one entry per path "
                        f"({len(paths)} paths); {hint}")
    if not paths:
        raise DataError(f"{path} lists no images")
    bad = [p for p in paths if not isinstance(p, str) or not p]
    if bad:
        raise DataError(f"{path}: every 'path' entry must be a non-empty string, got {bad[0]!r}")
    return FeatureList(path, tuple(paths), tuple(str(i) for i in ids))


def identities(features: FeatureList, image_set: str) -> tuple[str, ...]:
    """The identity of each listed image: the FaceScrub `id`, or the MegaFace user folder.

    Args:
        features: The list.
        image_set: `megaface` or `facescrub`.
    """
    if image_set == "facescrub":
        return features.ids
    return tuple(str(PurePosixPath(p).parent) for p in features.paths)


def megaface_noise_key(path: str) -> str:
    """The form a MegaFace noise list names an image in: its last three path components.

    Args:
        path: An image path (any prefix).
    """
    return "/".join(PurePosixPath(path.replace("\\", "/")).parts[-3:])


def facescrub_noise_key(path: str) -> str:
    """The form a FaceScrub noise entry is matched on: the file stem, spaces as underscores.

    Args:
        path: An image path or file name.
    """
    return PurePosixPath(path.replace("\\", "/")).stem.replace(" ", "_")


NOISE_KEYS: dict[str, Callable[[str], str]] = {
    "megaface": megaface_noise_key, "facescrub": facescrub_noise_key}


def read_noises(path: str | os.PathLike, image_set: str) -> set[str]:
    """Reads a published noise list into the keys `NOISE_KEYS[image_set]` matches images on.

    Args:
        path: `megaface_noises.txt` or `facescrub_noises.txt`.
        image_set: `megaface` or `facescrub`.

    Raises:
        DataError: If the file is missing or lists nothing.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"noise list {path} not found; --noises must hold "
                        f"{' and '.join(NOISE_FILES.values())} (InsightFace's MegaFace noise lists)")
    keys = set()
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        # megaface_noises.txt may carry an index column before the path.
        keys.add(NOISE_KEYS[image_set](line.split("\t")[-1].strip()))
    if not keys:
        raise DataError(f"noise list {path} names no images")
    return keys


@dataclass(frozen=True)
class ManifestRow:
    """One image of a manifest (see the module docstring for the columns)."""

    path: str
    label: int
    identity: str
    index: int
    set: str


def write_manifest(path: str | os.PathLike, rows: Sequence[ManifestRow]) -> None:
    """Writes a manifest TSV, atomically.

    Args:
        path: The `.tsv` file.
        rows: Its images.
    """
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows((r.path, r.label, r.identity, r.index, r.set) for r in rows)


def read_manifest(path: str | os.PathLike) -> list[ManifestRow]:
    """Reads a manifest, resolving each image path against the manifest's folder.

    Args:
        path: A `.tsv` written by `write_manifest`.

    Raises:
        DataError: If it is missing, has another header, a malformed row, or no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest {path} not found; write it with preprocessing/prepare_megaface.py")
    rows = []
    with path.open(newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None or tuple(header) != MANIFEST_COLUMNS:
            raise DataError(f"{path} does not start with the manifest header "
                            f"{' '.join(MANIFEST_COLUMNS)!r}; write it with prepare_megaface.py")
        for line, fields in enumerate(reader, 2):
            try:
                image, label, identity, index, image_set = fields
                rows.append(ManifestRow(str(path.parent / image), int(label), identity, int(index),
                                        image_set))
            except ValueError:
                raise DataError(f"{path}:{line}: expected {len(MANIFEST_COLUMNS)} tab-separated "
                                f"fields with integer label and index, got {fields!r}") from None
    if not rows:
        raise DataError(f"manifest {path} lists no images")
    return rows


# -- Alignment ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlignJob:
    """One image to align: where it is, where its crop goes, its annotation file ("" for none)."""

    source: str
    target: str
    annotation: str


# How an image's crop was obtained, besides `sparse_embed.faces.aligner`'s outcomes.
AS_IS = "as_is"  # already a crop of the requested size (InsightFace's MegaFace package ships such)
# The face `align_faces` picks where the annotation gives no box: MegaFace photos centre their subject.
POLICY = "center"

DetectorFactory = Callable[[], "FaceDetector"]


def mtcnn_detector() -> FaceDetector:
    """The default detector: MTCNN (imports TensorFlow), built once per worker on first need."""
    from sparse_embed.faces.detect import FaceDetector

    return FaceDetector()


class _Worker:
    """One process's crop size and detector, the detector built only if an image needs it."""

    def __init__(self, crop: str, make_detector: DetectorFactory) -> None:
        self.crop = crop
        self.make_detector = make_detector
        self._detector: FaceDetector | None = None

    def detector(self) -> FaceDetector:
        if self._detector is None:
            self._detector = self.make_detector()
        return self._detector

    def align(self, job: AlignJob) -> tuple[str, str]:
        """Aligns one image and writes its crop: (outcome, "") or ("", the reason it failed)."""
        from sparse_embed.faces.align import template
        from sparse_embed.faces.aligner import align_faces, read_image, write_jpeg
        from sparse_embed.faces.landmarks import read_megaface_json

        image = read_image(Path(job.source))
        if image is None:
            return "", "not a decodable image"
        size = template(self.crop)
        annotation = None
        if job.annotation and os.path.isfile(job.annotation):
            try:
                annotation = read_megaface_json(job.annotation)
            except DataError as e:
                return "", f"annotation: {e}"
        if annotation is None and image.shape[:2] == (size.height, size.width):
            crop, outcome = image, AS_IS
        else:
            needs_detector = annotation is None or annotation.landmarks is None
            aligned = align_faces(image, self.detector() if needs_detector else None, self.crop,
                                  POLICY, annotation)
            if not aligned.crops:
                return "", f"no face found ({aligned.faces_found} detected, none chosen)"
            crop, outcome = aligned.crops[0], aligned.outcome
        write_jpeg(Path(job.target), crop)
        return outcome, ""


_WORKER: _Worker | None = None


def _init_worker(crop: str, make_detector: DetectorFactory) -> None:
    global _WORKER
    _WORKER = _Worker(crop, make_detector)


def _align_chunk(jobs: Sequence[AlignJob]) -> list[tuple[str, str]]:
    assert _WORKER is not None, "_init_worker sets the worker"
    return [_WORKER.align(job) for job in jobs]


def align_images(jobs: Sequence[AlignJob], crop: str = "112x112", num_workers: int = 1,
                 make_detector: DetectorFactory = mtcnn_detector, chunk_size: int = 64,
                 desc: str = "align") -> list[tuple[str, str]]:
    """Aligns images to `crop` and writes each crop as a JPEG at its job's target.

    An image whose annotation gives its box (MegaFace's `.jpg.json`) is aligned on the
    detection that overlaps the box, or on the annotation's eyes and nose when none does
    (`sparse_embed.faces.aligner.align_faces`); one without an annotation is kept as it is
    when it already has the crop's size, and is detected (the face nearest the centre)
    otherwise.

    Args:
        jobs: The images.
        crop: A registered crop name ("112x112", "96x112").
        num_workers: Processes aligning images.
        make_detector: Builds a worker's face detector, called only when an image needs one.
        chunk_size: Images handed to a worker at a time.
        desc: Label of the progress bar.

    Returns:
        Per job, (outcome, "") when aligned or ("", reason) when it failed.

    Raises:
        ValueError: If `num_workers` or `chunk_size` is below 1.
    """
    if num_workers < 1 or chunk_size < 1:
        raise ValueError(f"num_workers and chunk_size must be >= 1, got {num_workers}, {chunk_size}")
    chunks = [jobs[i:i + chunk_size] for i in range(0, len(jobs), chunk_size)]
    pool = None
    if num_workers == 1:
        _init_worker(crop, make_detector)
        results: Iterator[list[tuple[str, str]]] = map(_align_chunk, chunks)
    else:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = multiprocessing.get_context(method).Pool(num_workers, initializer=_init_worker,
                                                        initargs=(crop, make_detector))
        results = pool.imap(_align_chunk, chunks)
    outcomes: list[tuple[str, str]] = []
    try:
        with tqdm(total=len(jobs), unit="img", desc=desc, disable=None) as bar:
            for chunk, chunk_outcomes in zip(chunks, results, strict=True):
                outcomes += chunk_outcomes
                bar.update(len(chunk))
    finally:
        if pool is not None:
            pool.terminate()
    return outcomes


def prepare_set(image_set: str, features: FeatureList, root: str | os.PathLike,
                output: str | os.PathLike, noises: set[str] | None = None, crop: str = "112x112",
                num_workers: int = 1, make_detector: DetectorFactory = mtcnn_detector
                ) -> dict[str, object]:
    """Aligns the listed images of one set, leaving out noise and missing images, and writes its manifest.

    Args:
        image_set: `megaface` or `facescrub`.
        features: The set's devkit list.
        root: The folder the list's paths are relative to.
        output: Output folder: crops under `<output>/<image_set>/` (the listed path, as `.jpg`),
            manifest `<output>/<image_set>.tsv`.
        noises: Keys of the set's noise list (`read_noises`); None keeps every image.
        crop: A registered crop name.
        num_workers: Processes aligning images.
        make_detector: Builds a worker's face detector (see `align_images`).

    Returns:
        Summary: list, listed, noise_removed, missing, aligned (and `aligned_<outcome>` counts),
        failed, identities, manifest, and the first `(path, reason)` of the missing and failed images.

    Raises:
        DataError: If `root` is not a folder.
    """
    root, output = Path(root), Path(output)
    if not root.is_dir():
        raise DataError(f"{image_set} image folder {root} does not exist; pass the folder the "
                        f"devkit list's paths are relative to")
    names = identities(features, image_set)
    key = NOISE_KEYS[image_set]
    kept, noise_removed, missing = [], 0, []
    for index, (rel, identity) in enumerate(zip(features.paths, names, strict=True)):
        if noises is not None and key(rel) in noises:
            noise_removed += 1
        elif not (root / rel).is_file():
            missing.append((rel, "not found"))
        else:
            kept.append((index, rel, identity))
    from sparse_embed.faces.aligner import output_names

    annotate = image_set == "megaface"
    targets = [f"{image_set}/{output_names(rel, 1)[0]}" for _, rel, _ in kept]
    jobs = [AlignJob(str(root / rel), str(output / target),
                     str(root / rel) + ".json" if annotate else "")
            for (_, rel, _), target in zip(kept, targets, strict=True)]
    results = align_images(jobs, crop, num_workers, make_detector, desc=image_set)
    aligned = [(*k, target) for k, target, (outcome, _) in zip(kept, targets, results, strict=True)
               if outcome]
    failed = [(rel, reason) for (_, rel, _), (_, reason) in zip(kept, results, strict=True) if reason]
    outcomes = Counter(outcome for outcome, _ in results if outcome)
    label_of = {name: i for i, name in enumerate(sorted({identity for _, _, identity, _ in aligned}))}
    rows = [ManifestRow(target, label_of[identity], identity, index, image_set)
            for index, _, identity, target in aligned]
    manifest = output / f"{image_set}.tsv"
    if rows:
        write_manifest(manifest, rows)
    return {
        "list": features.source.name,
        "listed": len(features.paths),
        "noise_removed": noise_removed,
        "missing": len(missing),
        "aligned": len(rows),
        **{f"aligned_{outcome}": count for outcome, count in sorted(outcomes.items())},
        "failed": len(failed),
        "identities": len(label_of),
        "manifest": str(manifest) if rows else "(none: no image aligned)",
        "missing_examples": missing[:SHOWN_EXAMPLES],
        "failed_examples": failed[:SHOWN_EXAMPLES],
    }


def prepare(output: str | os.PathLike, devkit: str | os.PathLike,
            megaface_root: str | os.PathLike | None = None,
            facescrub_root: str | os.PathLike | None = None, size: int = 1000000, set_index: int = 1,
            noises: str | os.PathLike | None = None, crop: str = "112x112", num_workers: int = 1,
            make_detector: DetectorFactory = mtcnn_detector) -> dict[str, dict[str, object]]:
    """Reads the devkit lists (and noise lists), aligns the images of each set given, writes manifests.

    Every list and noise file is read before any image is touched, so a bad one fails at once.

    Args:
        output: Output folder (see `prepare_set`).
        devkit: The devkit folder or its `templatelists/` folder.
        megaface_root: MegaFace's `FlickrFinal2` folder; None skips the distractors.
        facescrub_root: The FaceScrub image folder; None skips the probes.
        size: Distractor list size (one of SIZES).
        set_index: Distractor list set (1-based).
        noises: Folder with `megaface_noises.txt` / `facescrub_noises.txt`; None removes nothing.
        crop: A registered crop name.
        num_workers: Processes aligning images.
        make_detector: Builds a worker's face detector (see `align_images`).

    Returns:
        The `prepare_set` summary of each set prepared.

    Raises:
        ConfigError: If neither root is given, or the size, set or crop is invalid.
        DataError: If a list or noise file is missing or malformed, or a root does not exist.
    """
    from sparse_embed.faces.align import template

    template(crop)
    roots = {"megaface": megaface_root, "facescrub": facescrub_root}
    if not any(roots.values()):
        raise ConfigError("need --megaface_root, --facescrub_root or both")
    names = {"megaface": distractor_list_name(size, set_index), "facescrub": PROBE_LIST}
    inputs = {}
    for image_set, root in roots.items():
        if root:
            features = read_feature_list(find_list(devkit, names[image_set]))
            noise = None if noises is None else read_noises(Path(noises) / NOISE_FILES[image_set],
                                                            image_set)
            inputs[image_set] = (features, root, noise)
    return {image_set: prepare_set(image_set, features, root, output, noise, crop, num_workers,
                                   make_detector)
            for image_set, (features, root, noise) in inputs.items()}


# -- Protocols ----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Split:
    """Queries and database of a protocol, as row indices (see the module docstring).

    Attributes:
        protocol: The protocol's name.
        queries: int64 [Q] query rows, ascending.
        database: int64 [M] rows every query is searched against, ascending.
        gallery: Per query, int64 rows added to its database one at a time (`facescrub`);
            empty arrays where the database already holds the query's identity (`megaface`).
    """

    protocol: str
    queries: np.ndarray
    database: np.ndarray
    gallery: tuple[np.ndarray, ...]

    @property
    def num_trials(self) -> int:
        """Trials `rank1` counts: gallery rows, or one per query where there are none."""
        return sum(max(len(g), 1) for g in self.gallery)


PROTOCOLS: Registry[Callable[[np.ndarray, np.ndarray, int, int], Split]] = Registry("MegaFace protocol")


def _rows_by_label(rows: np.ndarray, labels: np.ndarray) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for row in rows:
        groups[int(labels[row])].append(int(row))
    return groups


@PROTOCOLS.register("facescrub")
def _facescrub(labels: np.ndarray, sets: np.ndarray, num_queries: int, seed: int) -> Split:
    del num_queries, seed  # every probe takes part
    groups = _rows_by_label(np.flatnonzero(sets == "facescrub"), labels)
    queries, gallery = [], []
    for rows in groups.values():
        if len(rows) < 2:
            continue
        for row in rows:
            queries.append(row)
            gallery.append(np.array([r for r in rows if r != row], np.int64))
    order = np.argsort(queries, kind="stable")
    return Split("facescrub", np.asarray(queries, np.int64)[order],
                 np.flatnonzero(sets == "megaface").astype(np.int64), tuple(gallery[i] for i in order))


@PROTOCOLS.register("megaface")
def _megaface(labels: np.ndarray, sets: np.ndarray, num_queries: int, seed: int) -> Split:
    rows = np.flatnonzero(sets == "megaface")
    groups = _rows_by_label(rows, labels)
    eligible = sorted(label for label, members in groups.items() if len(members) >= 2)
    if not eligible:
        raise DataError("the megaface protocol needs an identity with at least two MegaFace images; "
                        "none has")
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(eligible)[:num_queries]
    queries = np.sort([groups[int(label)][rng.integers(len(groups[int(label)]))] for label in chosen])
    database = np.setdiff1d(rows, queries).astype(np.int64)
    return Split("megaface", queries.astype(np.int64), database,
                 tuple(np.empty(0, np.int64) for _ in queries))


def query_database_split(labels: Sequence[int], sets: Sequence[str], protocol: str,
                         num_queries: int = DEFAULT_NUM_QUERIES, seed: int = 0) -> Split:
    """Splits embedded MegaFace and FaceScrub rows into queries and database under a protocol.

    Args:
        labels: Identity label of each row (labels are compared within a set only).
        sets: `megaface` or `facescrub`, per row.
        protocol: A name in PROTOCOLS (`facescrub`, `megaface`).
        num_queries: Queries drawn by `megaface` (fewer when fewer identities qualify).
        seed: Seed of `megaface`'s draw.

    Returns:
        The split, as indices into the rows.

    Raises:
        ConfigError: If the protocol is unknown or `num_queries` is below 1.
        DataError: If the rows leave the protocol without queries or database.
        ValueError: If `labels` and `sets` differ in length.
    """
    make = PROTOCOLS.get(protocol)
    if num_queries < 1:
        raise ConfigError(f"num_queries must be >= 1, got {num_queries}")
    labels_array, sets_array = np.asarray(labels, np.int64), np.asarray(sets, dtype=str)
    if labels_array.shape != sets_array.shape or labels_array.ndim != 1:
        raise ValueError(f"need one set per label, got {labels_array.shape} and {sets_array.shape}")
    split = make(labels_array, sets_array, num_queries, seed)
    if not len(split.queries) or not len(split.database):
        raise DataError(f"the {protocol} protocol finds {len(split.queries)} queries and "
                        f"{len(split.database)} database rows in these embeddings; it needs both "
                        f"(facescrub: FaceScrub identities with two or more images and MegaFace rows)")
    return split


def rank1(split: Split, embedding: np.ndarray, labels: Sequence[int]) -> float:
    """Rank-1 identification rate of a split: the share of trials no other identity outscores.

    Args:
        split: The protocol's split.
        embedding: float [N, D], one row per row the split indexes.
        labels: Identity label of each row.
    """
    emb = np.asarray(embedding, np.float32)
    labels = np.asarray(labels, np.int64)
    queries = emb[split.queries]
    # megaface: the database holds the query's identity, whose rows are matches, not competitors.
    same = labels[split.queries] if split.protocol == "megaface" else None
    best_other = np.full(len(queries), -np.inf, np.float32)
    for start in range(0, len(split.database), _SCORE_CHUNK_ROWS):
        rows = split.database[start:start + _SCORE_CHUNK_ROWS]
        scores = queries @ emb[rows].T
        if same is not None:
            scores[same[:, None] == labels[rows][None, :]] = -np.inf
        best_other = np.maximum(best_other, scores.max(axis=1))
    if same is None:
        # Each gallery row joins the distractors alone: a hit when none of them outscores it.
        hits = sum(int((emb[g] @ q >= b).sum())
                   for g, q, b in zip(split.gallery, queries, best_other, strict=True))
    else:
        hits = 0
        for label in np.unique(same):
            at = np.flatnonzero(same == label)
            members = split.database[labels[split.database] == label]
            best_match = (queries[at] @ emb[members].T).max(axis=1)
            hits += int((best_match >= best_other[at]).sum())
    return hits / split.num_trials


def split_bins(split: Split, embedding: np.ndarray, labels: Sequence[int], output: str | os.PathLike,
               zero_threshold: float | None = None, dense: bool = False) -> dict[str, object]:
    """Writes a split as `<output>/<protocol>_queries.bin` and `<protocol>_database.bin`.

    Args:
        split: The protocol's split.
        embedding: float [N, D], one row per row the split indexes.
        labels: Identity label of each row.
        output: Output folder.
        zero_threshold: Entries with |x| at or below it are left out; None: the search default.
        dense: Also write the rows as float32 `.npy` (for the search binary's dense re-ranking).

    Returns:
        Summary: the files written, queries, database rows, trials.
    """
    from sparse_embed.search import DEFAULT_ZERO_THRESHOLD, write_bin

    threshold = DEFAULT_ZERO_THRESHOLD if zero_threshold is None else zero_threshold
    labels = np.asarray(labels, np.int64)
    database_labels = labels[split.database]
    if split.protocol == "facescrub":
        database_labels = np.full(len(split.database), -1, np.int64)
    files = {}
    for part, rows, part_labels in (("queries", split.queries, labels[split.queries]),
                                    ("database", split.database, database_labels)):
        path = Path(output) / f"{split.protocol}_{part}.bin"
        write_bin(path, np.asarray(embedding[rows], np.float32), part_labels, threshold)
        files[part] = str(path)
        if dense:
            npy = path.with_suffix(".npy")
            with atomic_path(npy) as tmp, open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(embedding[rows], np.float32))
            files[f"{part} dense"] = str(npy)
    return {**files, "num_queries": len(split.queries), "database_rows": len(split.database),
            "trials": split.num_trials}


def _read_embeddings(paths: dict[str, str | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenates the HDF5 files of the sets given: (embedding, labels, sets)."""
    import h5py

    embeddings, labels, sets = [], [], []
    for image_set, path in paths.items():
        if not path:
            continue
        if not Path(path).is_file():
            raise DataError(f"embedding file {path} not found; write it with "
                            f"python -m sparse_embed.embed --manifest")
        try:
            with h5py.File(path, "r") as f:
                embeddings.append(np.asarray(f["embedding"][:], np.float32))
                labels.append(np.asarray(f["label"][:], np.int64))
        except (OSError, KeyError) as e:
            raise DataError(f"{path} is not an embedding HDF5 file with 'embedding' and 'label' "
                            f"({' '.join(str(e).split())}); write it with sparse_embed.embed") from None
        sets.append(np.full(len(labels[-1]), image_set))
    dims = {e.shape[1] for e in embeddings if e.ndim == 2}
    shapes_ok = all(e.ndim == 2 and len(e) == len(y) for e, y in zip(embeddings, labels, strict=True))
    if len(dims) != 1 or not shapes_ok:
        raise DataError(f"the embedding files must hold [N, D] embeddings with one label per row "
                        f"and one D (got dims {sorted(dims)}); embed both sets with the same model")
    return np.concatenate(embeddings), np.concatenate(labels), np.concatenate(sets)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m sparse_embed.data.megaface split-bins ...`.

    Args:
        argv: Arguments without the program name; None reads sys.argv.
    """
    from sparse_embed.cli import user_errors_exit

    parser = argparse.ArgumentParser(prog="python -m sparse_embed.data.megaface",
                                     description="MegaFace / FaceScrub protocol tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    bins = commands.add_parser("split-bins", help="Embeddings -> a protocol's query and database .bin.")
    bins.add_argument("--protocol", required=True, choices=PROTOCOLS.names())
    bins.add_argument("--megaface", required=True, help="HDF5 embeddings of the MegaFace manifest.")
    bins.add_argument("--facescrub", help="HDF5 embeddings of the FaceScrub manifest (facescrub).")
    bins.add_argument("--output", required=True, help="Folder for <protocol>_{queries,database}.bin.")
    bins.add_argument("--num_queries", type=int, default=DEFAULT_NUM_QUERIES,
                      help="Queries drawn by the megaface protocol.")
    bins.add_argument("--seed", type=int, default=0, help="Seed of the megaface protocol's draw.")
    bins.add_argument("--threshold", type=float, default=None,
                      help="Leave out entries with |x| at or below it (default: the search default).")
    bins.add_argument("--dense", action="store_true", help="Also write float32 .npy for re-ranking.")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    @user_errors_exit
    def run() -> None:
        from sparse_embed.data import format_summary

        if args.protocol == "facescrub" and not args.facescrub:
            raise ConfigError("--protocol=facescrub needs --facescrub (the probes' HDF5 file)")
        embedding, labels, sets = _read_embeddings(
            {"megaface": args.megaface, "facescrub": args.facescrub})
        split = query_database_split(labels, sets, args.protocol, args.num_queries, args.seed)
        summary = split_bins(split, embedding, labels, args.output, args.threshold, args.dense)
        summary["rank-1"] = f"{rank1(split, embedding, labels):.4f}"
        print(format_summary(f"{args.protocol} protocol", list(summary.items())))

    run()


if __name__ == "__main__":
    main()
