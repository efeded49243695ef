"""The probabilistic methods under Horovod and tf.distribute: a step of 2 workers equals one process.

One launch checks every method (tests/distributed_checks.py, `pe_step_equivalence`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, horovodrun, run_module_script

pytestmark = pytest.mark.multiprocess

CHECKS = str(ROOT / "tests" / "distributed_checks.py")
GATHERED = ("hib", "pfe", "spe")
PER_EXAMPLE = ("dul_reg", "dul_cls", "scf", "vmf_fl", "vmf_loss", "dsml")


def assert_equal_one_process(rank: dict, method: str) -> None:
    np.testing.assert_allclose(rank[f"{method}/weights"], rank[f"{method}/reference_weights"],
                               rtol=1e-4, atol=1e-5, err_msg=method)
    np.testing.assert_allclose(rank[f"{method}/loss"], rank[f"{method}/reference_loss"], rtol=1e-5,
                               err_msg=method)


def test_two_ranks_of_every_method_equal_one_process(tmp_path: Path) -> None:
    """2 Horovod ranks x batch 4 == 1 process, with the samples of a fixed seed.

    HIB, PFE and SPE gather the batch (`head.gather_batch`): the step is that of
    the 8 examples together, whose pairs (and SPE's prototypes, with a class on
    both ranks) cross the ranks, which the mean of the ranks' own losses does
    not give. The other methods' losses are means over examples: the step is
    that of the mean of the ranks' losses.
    """
    proc = horovodrun(2, CHECKS, "pe_step_equivalence", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(2)]
    for method in GATHERED + PER_EXAMPLE:
        assert_equal_one_process(ranks[0], method)
        np.testing.assert_array_equal(ranks[0][f"{method}/weights"], ranks[1][f"{method}/weights"])
        np.testing.assert_array_equal(ranks[0][f"{method}/loss"], ranks[1][f"{method}/loss"])
    for method in GATHERED:
        first = ranks[0]
        assert abs(first[f"{method}/reference_loss"] - first[f"{method}/local_reference_loss"]) > 1e-3, method


@pytest.mark.slow
def test_mirrored_two_replicas_of_every_method_equal_one_process(tmp_path: Path) -> None:
    """tf.distribute.MirroredStrategy on 2 logical CPUs: the same statements as for Horovod."""
    proc = run_module_script(CHECKS, "pe_step_equivalence", str(tmp_path), "mirrored")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = dict(np.load(tmp_path / "rank0.npz"))
    for method in GATHERED + PER_EXAMPLE:
        assert_equal_one_process(got, method)
