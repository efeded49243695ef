"""`evaluate nuisance`: rank correlation, nuisance recovery, the report and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from sparse_embed.data.embeddings import Embeddings, write_hdf5
from sparse_embed.data.synthetic import encode_jpeg, render_face, sample_identity
from sparse_embed.errors import DataError
from sparse_embed.metrics import nuisance

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("x, y", [
    ([1.0, 2.0, 3.0, 4.0, 5.0], [5.0, 6.0, 7.0, 8.0, 7.0]),
    ([0.0, 0.0, 1.0, 1.0, 0.0, 1.0], [0.3, 0.1, 0.9, 0.2, 0.2, 0.7]),   # ties in both
    (np.linspace(0, 1, 40) ** 2, np.cos(np.arange(40))),
])
def test_spearman_equals_scipy(x, y):
    rho, p = nuisance.spearman(x, y)
    expected = stats.spearmanr(x, y)
    assert rho == pytest.approx(expected.statistic, abs=1e-12)
    assert p == pytest.approx(expected.pvalue, rel=1e-9)


def test_spearman_of_a_constant_is_nan_and_bad_shapes_raise():
    assert all(np.isnan(nuisance.spearman([1, 1, 1], [1, 2, 3])))
    with pytest.raises(ValueError, match="one length"):
        nuisance.spearman([1, 2, 3], [1, 2])


def test_recovered_nuisance_renders_the_written_image(tiny_data: Path):
    seed = json.loads((tiny_data / "synthetic.json").read_text())["seed"]
    for path in sorted((tiny_data / "test").glob("*/*.jpg"))[:3]:
        identity, _ = nuisance.image_indices(str(path))
        recovered = nuisance.recover_nuisances(seed, [str(path)])[0]
        pixels = render_face(sample_identity(seed, identity), recovered, 112)
        assert encode_jpeg(pixels) == path.read_bytes()


def test_image_indices_reject_other_paths():
    assert nuisance.image_indices("data/test/id_00012/3.jpg") == (12, 3)
    with pytest.raises(DataError, match="not a synthetic image"):
        nuisance.image_indices("lfw/George_Bush/0001.jpg")


def _fake_embeddings(data: Path, path: Path, confidence_of) -> None:
    """Every held-out image, embedded as its identity's axis plus noise, with a chosen confidence."""
    seed = json.loads((data / "synthetic.json").read_text())["seed"]
    files = sorted(str(p) for p in (data / "test").glob("*/*.jpg"))
    keys = [nuisance.image_indices(f) for f in files]
    rng = np.random.default_rng(0)
    emb = np.eye(16, dtype=np.float32)[[k[0] % 16 for k in keys]] + rng.normal(0, 0.6, (len(keys), 16))
    conf = np.array([confidence_of(nuisance.sample_nuisance(seed, *k)) for k in keys], np.float32)
    write_hdf5(path, Embeddings(emb.astype(np.float32), np.zeros(len(keys), np.int64), tuple(files), conf))


def test_report_finds_a_confidence_that_is_minus_blur(tiny_data: Path, tmp_path: Path, capsys):
    hdf5 = tmp_path / "e.hdf5"
    _fake_embeddings(tiny_data, hdf5, lambda n: -n.blur)
    out = tmp_path / "n.json"
    nuisance.main([f"--embeddings={hdf5}", f"--data_dir={tiny_data}", f"--output={out}"])
    report = json.loads(out.read_text())
    assert report["factors"]["blur"]["rho"] == pytest.approx(-1.0)
    assert set(report["factors"]) == set(nuisance.FACTORS)
    pairs = report["pairs"]
    assert pairs["count"] == 24 and 0 <= pairs["error_rate_least_confident"] <= 1
    assert "blur" in capsys.readouterr().out


def test_error_prediction_on_hand_made_pairs():
    # Pairs 0-3 decided right at the best threshold, pair 4 wrong; the wrong one is least confident.
    scores = np.array([0.9, 0.8, 0.1, 0.2, 0.85])
    issame = np.array([True, True, False, False, False])
    figures = nuisance.error_prediction(scores, issame, np.array([5.0, 4.0, 3.0, 2.0, 1.0]),
                                        least_confident=0.2)
    assert figures["error_rate"] == pytest.approx(0.2)
    assert figures["error_rate_least_confident"] == 1.0
    assert figures["confidence_auroc"] == 1.0


def test_a_file_without_confidence_exits_2(tiny_data: Path, tmp_path: Path, capsys):
    hdf5 = tmp_path / "e.hdf5"
    write_hdf5(hdf5, Embeddings(np.ones((1, 4), np.float32), np.zeros(1, np.int64),
                                (str(tiny_data / "test/id_00008/0.jpg"),)))
    with pytest.raises(SystemExit) as exit_info:
        nuisance.main([f"--embeddings={hdf5}", f"--data_dir={tiny_data}"])
    assert exit_info.value.code == 2
    assert "no confidence" in capsys.readouterr().err
