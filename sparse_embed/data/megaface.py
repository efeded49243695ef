"""MegaFace challenge 1 data: the devkit's image lists, the published noise lists, aligned images, manifests.

    python -m sparse_embed.preprocessing.prepare_megaface --megaface_root=FlickrFinal2 \
        --facescrub_root=facescrub --devkit=devkit/templatelists --size=1000000 --set=1 \
        --noises=NOISES --output=data/megaface
    python -m sparse_embed.embed --model_dir=RUN --manifest=data/megaface/megaface.tsv \
        --output=megaface_RUN.hdf5

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

`python -m sparse_embed.embed --manifest=<set>.tsv` embeds a manifest into the HDF5 files
(`megaface_<run>.hdf5`, `facescrub_<run>.hdf5`) that the challenge's protocols read: queries and
database, rank-1 and the search binary's `.bin` files are in `sparse_embed.metrics.megaface`.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from tqdm import tqdm

from sparse_embed.errors import ConfigError, DataError
from sparse_embed.fileio import atomic_path

if TYPE_CHECKING:
    from sparse_embed.faces.detect import FaceDetector

SETS = ("megaface", "facescrub")
SIZES = (10, 100, 1000, 10000, 100000, 1000000)
PROBE_LIST = "facescrub_features_list.json"
NOISE_FILES = {"megaface": "megaface_noises.txt", "facescrub": "facescrub_noises.txt"}
MANIFEST_COLUMNS = ("path", "label", "identity", "index", "set")
# How many missing or failed images the summary names; the rest are only counted.
SHOWN_EXAMPLES = 5


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
        raise DataError(f"manifest {path} not found; write it with sparse-embed-prepare-megaface")
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


# `split-bins` moved to `python -m sparse_embed.metrics.megaface` (the protocols are metrics,
# and data/ imports none). The old command keeps working for one release: it hands its
# arguments to the new module in a fresh process, so this module still imports no metric.
if __name__ == "__main__":
    import sys

    print("python -m sparse_embed.data.megaface: warning: this command is deprecated and goes in the "
          "next release; use python -m sparse_embed.metrics.megaface", file=sys.stderr)
    os.execv(sys.executable, [sys.executable, "-m", "sparse_embed.metrics.megaface", *sys.argv[1:]])
