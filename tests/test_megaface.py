"""MegaFace devkit lists and noise lists in their published layouts, manifests, protocols, .bin files."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_main_user_error, call_main, run_module
from PIL import Image

from sparse_embed.data import megaface
from sparse_embed.metrics.megaface import Split, query_database_split, rank1, split_bins
from sparse_embed.preprocessing.prepare_megaface import main as prepare_main

pytestmark = pytest.mark.unit

SCRIPT = "sparse_embed.preprocessing.prepare_megaface"

# MegaFace distractors: `<prefix>/<user>@N00/<photo>_<face>.jpg` under FlickrFinal2.
MEGAFACE = ["100/10000@N00/1_0.jpg", "100/10000@N00/2_0.jpg", "100/10000@N00/3_0.jpg",
            "200/20000@N00/4_0.jpg", "200/20000@N00/5_0.jpg", "300/30000@N00/6_0.jpg",
            "300/30000@N00/7_0.jpg"]
MEGAFACE_NOISE = "200/20000@N00/5_0.jpg"
MEGAFACE_MISSING = "300/30000@N00/7_0.jpg"
MEGAFACE_LARGE = "300/30000@N00/6_0.jpg"  # a full photo with its .jpg.json box
# FaceScrub probes: `<Name>/<Name>_<n>.<ext>`, `id` the person's name.
FACESCRUB = [("Aaron Eckhart", "Aaron Eckhart/Aaron Eckhart_1.jpg"),
             ("Aaron Eckhart", "Aaron Eckhart/Aaron Eckhart_2.jpg"),
             ("Aaron Eckhart", "Aaron Eckhart/Aaron Eckhart_3.jpg"),
             ("Adam Brody", "Adam Brody/Adam_Brody_7.png"),
             ("Adam Brody", "Adam Brody/Adam_Brody_9.png")]
FACESCRUB_NOISE = "Aaron_Eckhart_2.jpg"


def _image(path: Path, seed: int, size: tuple[int, int] = (112, 112)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _feature_list(path: Path, paths: list[str], ids: list) -> None:
    """The devkit's template list: a JSON object with parallel `id` and `path` lists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"id": ids, "path": paths}, sort_keys=True, indent=4))


def _dataset(tmp_path: Path) -> dict[str, Path]:
    """A devkit (templatelists/), InsightFace's noise lists and both image trees."""
    devkit = tmp_path / "devkit"
    _feature_list(devkit / "templatelists" / "megaface_features_list.json_10_1", MEGAFACE,
                  list(range(len(MEGAFACE))))
    _feature_list(devkit / "templatelists" / "facescrub_features_list.json",
                  [p for _, p in FACESCRUB], [i for i, _ in FACESCRUB])
    mf_root, fs_root = tmp_path / "FlickrFinal2", tmp_path / "facescrub"
    for i, rel in enumerate(MEGAFACE):
        if rel == MEGAFACE_LARGE:
            _image(mf_root / rel, i, (200, 160))
            (mf_root / f"{rel}.json").write_text(json.dumps({
                "bounding_box": {"x": 60, "y": 40, "width": 80, "height": 90},
                "landmarks": {"0": {"x": 118.0, "y": 75.0}, "1": {"x": 82.0, "y": 75.0},
                              "2": {"x": 100.0, "y": 95.0}}}))
        elif rel != MEGAFACE_MISSING:
            _image(mf_root / rel, i)
    for i, (_, rel) in enumerate(FACESCRUB):
        _image(fs_root / rel, 100 + i)
    noises = tmp_path / "noises"
    noises.mkdir()
    # megaface_noises.txt: a comment header, then `<prefix>/<user>/<file>` (an index may lead).
    (noises / "megaface_noises.txt").write_text(
        f"# Noises list of MegaFace\n0\t{MEGAFACE_NOISE}\n999/99999@N00/9_0.jpg\n")
    # facescrub_noises.txt: a comment header, then `<Name_With_Underscores>_<n>.<ext>`.
    (noises / "facescrub_noises.txt").write_text(f"# Noises list of FaceScrub\n{FACESCRUB_NOISE}\n")
    return {"devkit": devkit, "megaface": mf_root, "facescrub": fs_root, "noises": noises}


def _read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


class _NoFaces:
    """A detector that finds nothing, so a boxed image falls back to its eyes and nose."""

    def detect(self, image: np.ndarray) -> list:
        return []


def test_feature_lists_and_noise_lists(tmp_path: Path) -> None:
    paths = _dataset(tmp_path)
    found = megaface.find_list(paths["devkit"], "megaface_features_list.json_10_1")
    features = megaface.read_feature_list(found)
    assert features.paths == tuple(MEGAFACE) and features.ids == tuple(map(str, range(7)))
    assert megaface.identities(features, "megaface")[:4] == ("100/10000@N00",) * 3 + ("200/20000@N00",)
    probes = megaface.read_feature_list(paths["devkit"] / "templatelists" / megaface.PROBE_LIST)
    assert megaface.identities(probes, "facescrub") == tuple(i for i, _ in FACESCRUB)
    assert megaface.read_noises(paths["noises"] / "megaface_noises.txt", "megaface") == {
        MEGAFACE_NOISE, "999/99999@N00/9_0.jpg"}
    keys = megaface.read_noises(paths["noises"] / "facescrub_noises.txt", "facescrub")
    assert [rel for _, rel in FACESCRUB if megaface.facescrub_noise_key(rel) in keys] == [
        "Aaron Eckhart/Aaron Eckhart_2.jpg"]
    assert megaface.distractor_list_name(1000000, 1) == "megaface_features_list.json_1000000_1"


def test_prepare_in_process_aligns_boxed_images_on_eyes_and_nose(tmp_path: Path) -> None:
    paths = _dataset(tmp_path)
    out = tmp_path / "out"
    summary = megaface.prepare(out, paths["devkit"], paths["megaface"], None, size=10,
                               noises=paths["noises"], make_detector=_NoFaces)["megaface"]
    assert (summary["listed"], summary["noise_removed"], summary["missing"]) == (7, 1, 1)
    assert (summary["aligned"], summary["aligned_as_is"], summary["aligned_eyes_nose"]) == (5, 4, 1)
    assert summary["failed"] == 0 and summary["identities"] == 3
    crop = np.asarray(Image.open(out / "megaface" / MEGAFACE_LARGE))
    assert crop.shape == (112, 112, 3)
    assert not (out / "facescrub.tsv").exists()


@pytest.mark.integration
def test_prepare_cli_end_to_end(tmp_path: Path) -> None:
    paths = _dataset(tmp_path)
    (paths["megaface"] / MEGAFACE_LARGE).write_text("not a JPEG")
    out = tmp_path / "out"
    proc = run_module(SCRIPT, f"--megaface_root={paths['megaface']}",
                             f"--facescrub_root={paths['facescrub']}", f"--devkit={paths['devkit']}",
                             "--list_size=10", "--list_set=1", f"--noises={paths['noises']}",
                             f"--output={out}", "--workers=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [re.match(r"^(.*?\S)\s{2,}(\S.*)$", line) for line in proc.stdout.splitlines()[2:]]
    summary = {row[1].strip(): row[2] for row in rows}
    assert summary["megaface listed"] == "7" and summary["megaface noise removed"] == "1"
    assert summary["megaface missing"] == "1" and summary["megaface aligned"] == "4"
    assert summary["facescrub listed"] == "5" and summary["facescrub noise removed"] == "1"
    assert summary["facescrub aligned"] == "4" and summary["facescrub identities"] == "2"
    assert summary[f"missing {MEGAFACE_MISSING}"] == "not found"
    assert summary["megaface failed"] == "1"
    assert summary[f"failed {MEGAFACE_LARGE}"] == "not a decodable image"
    rows = _read_tsv(out / "facescrub.tsv")
    assert [r["path"] for r in rows] == ["facescrub/Aaron Eckhart/Aaron Eckhart_1.jpg",
                                         "facescrub/Aaron Eckhart/Aaron Eckhart_3.jpg",
                                         "facescrub/Adam Brody/Adam_Brody_7.jpg",
                                         "facescrub/Adam Brody/Adam_Brody_9.jpg"]
    assert [(r["label"], r["identity"], r["index"], r["set"]) for r in rows] == [
        ("0", "Aaron Eckhart", "0", "facescrub"), ("0", "Aaron Eckhart", "2", "facescrub"),
        ("1", "Adam Brody", "3", "facescrub"), ("1", "Adam Brody", "4", "facescrub")]
    manifest = megaface.read_manifest(out / "megaface.tsv")
    assert [Path(r.path).relative_to(out / "megaface").as_posix() for r in manifest] == [
        MEGAFACE[0], MEGAFACE[1], MEGAFACE[2], MEGAFACE[3]]
    assert [r.label for r in manifest] == [0, 0, 0, 1] and all(Path(r.path).is_file() for r in manifest)


def test_bad_inputs_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """In this process (main(argv)); the command runs as a process in the test above."""
    paths = _dataset(tmp_path)
    base = [f"--megaface_root={paths['megaface']}", f"--output={tmp_path / 'o'}", "--list_size=10"]
    assert_main_user_error(capsys, prepare_main, [*base, f"--devkit={tmp_path / 'none'}"],
                           "megaface_features_list.json_10_1 not found")
    listing = paths["devkit"] / "templatelists" / "megaface_features_list.json_10_1"
    listing.write_text(json.dumps(MEGAFACE))
    assert_main_user_error(capsys, prepare_main, [*base, f"--devkit={paths['devkit']}"], "no 'path' list")
    listing.write_text("{not json")
    assert_main_user_error(capsys, prepare_main, [*base, f"--devkit={paths['devkit']}"], "is not JSON")
    _feature_list(listing, MEGAFACE, list(range(len(MEGAFACE))))
    (paths["noises"] / "megaface_noises.txt").unlink()
    assert_main_user_error(capsys, prepare_main, [*base, f"--devkit={paths['devkit']}",
                                                  f"--noises={paths['noises']}"],
                           "megaface_noises.txt not found")
    assert_main_user_error(capsys, prepare_main, [f"--devkit={paths['devkit']}", f"--output={tmp_path}"],
                           "need --megaface_root, --facescrub_root or both")


# Rows: (set, label). FaceScrub identity 1 has a single image; MegaFace identity 0 has two.
ROWS = [("megaface", 0), ("megaface", 0), ("megaface", 1), ("facescrub", 0), ("facescrub", 0),
        ("facescrub", 0), ("facescrub", 1), ("megaface", 2), ("facescrub", 2), ("facescrub", 2)]


def test_facescrub_protocol_by_hand() -> None:
    split = query_database_split([r[1] for r in ROWS], [r[0] for r in ROWS], "facescrub")
    assert split.queries.tolist() == [3, 4, 5, 8, 9]
    assert split.database.tolist() == [0, 1, 2, 7]
    assert [g.tolist() for g in split.gallery] == [[4, 5], [3, 5], [3, 4], [9], [8]]
    assert split.num_trials == 8  # 3 * 2 + 2 * 1 (query, gallery) pairs


def test_megaface_protocol_by_hand() -> None:
    for seed in range(4):
        split = query_database_split([r[1] for r in ROWS], [r[0] for r in ROWS], "megaface", seed=seed)
        assert len(split.queries) == 1 and split.queries[0] in (0, 1)
        assert split.database.tolist() == sorted({0, 1, 2, 7} - {int(split.queries[0])})
        assert split.num_trials == 1


def test_megaface_protocol_against_its_definition() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 40, 300)
    sets = np.where(rng.random(300) < 0.8, "megaface", "facescrub")
    split = query_database_split(labels, sets, "megaface", num_queries=12, seed=5)
    mf = np.flatnonzero(sets == "megaface")
    counts = {lab: int((labels[mf] == lab).sum()) for lab in set(labels[mf])}
    assert len(split.queries) == 12 and len(set(labels[split.queries])) == 12
    assert all(sets[q] == "megaface" and counts[labels[q]] >= 2 for q in split.queries)
    assert sorted(split.database.tolist() + split.queries.tolist()) == mf.tolist()
    again = query_database_split(labels, sets, "megaface", num_queries=12, seed=5)
    assert again.queries.tolist() == split.queries.tolist()
    every = query_database_split(labels, sets, "megaface", num_queries=10**6)
    assert len(every.queries) == sum(c >= 2 for c in counts.values())


def _brute_rank1(split: Split, emb: np.ndarray, labels: np.ndarray) -> float:
    """Rank of a match: 1 + the database rows of other identities scoring strictly higher."""
    hits = trials = 0
    for q, gallery in zip(split.queries, split.gallery, strict=True):
        if split.protocol == "facescrub":
            pairs = [(emb[q] @ emb[g], split.database) for g in gallery]
        else:
            same = split.database[labels[split.database] == labels[q]]
            pairs = [(max(emb[q] @ emb[m] for m in same),
                      split.database[labels[split.database] != labels[q]])]
        for match, others in pairs:
            trials += 1
            hits += sum(emb[q] @ emb[d] > match for d in others) == 0
    return hits / trials


@pytest.mark.parametrize("protocol", ["facescrub", "megaface"])
def test_rank1_and_bins_against_brute_force(protocol: str, tmp_path: Path) -> None:
    from sparse_embed.search import read_bin

    rng = np.random.default_rng(7)
    n = 400
    labels = rng.integers(0, 30, n)
    sets = np.where(np.arange(n) < 300, "megaface", "facescrub")
    centres = rng.normal(size=(30, 16))
    emb = np.maximum(centres[labels] + 0.9 * rng.normal(size=(n, 16)), 0).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True) + 1e-12
    split = query_database_split(labels, sets, protocol, num_queries=20)
    value = rank1(split, emb, labels)
    assert value == pytest.approx(_brute_rank1(split, emb, labels))
    assert 0.0 < value < 1.0
    summary = split_bins(split, emb, labels, tmp_path, zero_threshold=0.0)
    for part, rows in (("queries", split.queries), ("database", split.database)):
        matrix, bin_labels = read_bin(summary[part])
        np.testing.assert_allclose(matrix.toarray(), emb[rows], atol=1e-7)
        expected = labels[rows] if part == "queries" or protocol == "megaface" else -1
        np.testing.assert_array_equal(bin_labels, np.broadcast_to(expected, len(rows)))


def test_split_rejects_rows_without_queries() -> None:
    from sparse_embed.errors import ConfigError, DataError

    with pytest.raises(DataError, match="facescrub protocol finds 0 queries"):
        query_database_split([0, 1], ["megaface", "facescrub"], "facescrub")
    with pytest.raises(DataError, match="at least two MegaFace images"):
        query_database_split([0, 1], ["megaface", "megaface"], "megaface")
    with pytest.raises(ConfigError, match="unknown MegaFace protocol"):
        query_database_split([0], ["megaface"], "lfw")


@pytest.mark.integration
def test_manifest_to_hdf5_to_bins(smoke_run: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """embed --manifest (in this process: main(argv)), then split-bins, on the session's smoke run."""
    from sparse_embed.data.embeddings import read_hdf5
    from sparse_embed.embed import main as embed_main

    model_dir = smoke_run
    paths = _dataset(tmp_path)
    out = tmp_path / "out"
    megaface.prepare(out, paths["devkit"], paths["megaface"], paths["facescrub"], size=10,
                     make_detector=_NoFaces)
    (out / "broken.tsv").write_text("path\tlabel\n")
    assert_main_user_error(capsys, embed_main, [f"--model_dir={model_dir}",
                                                f"--manifest={out / 'broken.tsv'}",
                                                f"--output={tmp_path / 'x.hdf5'}"],
                           "does not start with the manifest header")
    hdf5 = {}
    for image_set in megaface.SETS:
        hdf5[image_set] = tmp_path / f"{image_set}_run.hdf5"
        assert call_main(embed_main, f"--model_dir={model_dir}", f"--manifest={out / f'{image_set}.tsv'}",
                         f"--output={hdf5[image_set]}") == 0
        rows = megaface.read_manifest(out / f"{image_set}.tsv")
        emb = read_hdf5(hdf5[image_set])
        assert emb.filename == tuple(r.path for r in rows)
        assert emb.label.tolist() == [r.label for r in rows]
    proc = run_module("sparse_embed.metrics.megaface", "split-bins", "--protocol=facescrub",
                      f"--megaface={hdf5['megaface']}", f"--facescrub={hdf5['facescrub']}",
                      f"--output={tmp_path / 'bins'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trials" in proc.stdout and "rank-1" in proc.stdout
    assert (tmp_path / "bins" / "facescrub_queries.bin").is_file()
    assert (tmp_path / "bins" / "facescrub_database.bin").is_file()
    # The command's old home keeps working for one release, with one deprecation line.
    old = run_module("sparse_embed.data.megaface", "split-bins", "--protocol=facescrub",
                     f"--megaface={hdf5['megaface']}", f"--facescrub={hdf5['facescrub']}",
                     f"--output={tmp_path / 'old_bins'}")
    assert old.returncode == 0, old.stderr[-3000:]
    assert "deprecated" in old.stderr and "sparse_embed.metrics.megaface" in old.stderr
    for name in ("facescrub_queries.bin", "facescrub_database.bin"):
        assert (tmp_path / "old_bins" / name).read_bytes() == (tmp_path / "bins" / name).read_bytes()
