"""Equal to the reference code of "Probabilistic Embeddings Revisited" on its own inputs.

Every quantity of the golden file (tests/data/pe/README.md; another file of the same format through
`SPARSE_EMBED_PE_GOLDEN`) is replayed here, once, by the replay of its kind (`REPLAYS`,
`DEVIATIONS`, `check_quantity`), which lives beside the other tests of that part: distributions,
scorers and parametrizations (test_distributions), losses (test_pe_losses), confidence metrics
(test_uncertainty_metrics), end-to-end retrieval (test_pe_nearest). A kind no replay knows
fails. A documented deviation (the reference is wrong, or its value depends on an unstable sort)
is checked against an independent computation by its replay instead of against the reference's
value. The test prints one line:

    PE parity: <N> of <M> quantities equal, <K> documented deviations: <names>
"""

from __future__ import annotations

import pytest
import test_distributions
import test_pe_losses
import test_pe_nearest
import test_uncertainty_metrics
from pe_golden import golden

pytestmark = pytest.mark.unit

AREAS = (test_distributions, test_pe_losses, test_uncertainty_metrics, test_pe_nearest)


def parity_line(equal: int, total: int, deviations: list[str]) -> str:
    """The summary line the issue names, exactly."""
    return (f"PE parity: {equal} of {total} quantities equal, {len(deviations)} documented deviations: "
            f"{', '.join(deviations) or 'none'}")


def test_every_golden_quantity_equals_the_reference(record_property: pytest.RecordProperty) -> None:
    checkers = {}
    for area in AREAS:
        for kind in area.REPLAYS:
            assert kind not in checkers, f"two replays of kind {kind}"
            checkers[kind] = area.check_quantity
    failures, deviating, equal = [], [], 0
    quantities = golden()
    for name, quantity in quantities.items():
        check = checkers.get(quantity["kind"])
        if check is None:
            failures.append(f"{name}: no replay knows kind {quantity['kind']!r}")
            continue
        try:
            met = check(name, quantity)
        except AssertionError as error:
            failures.append(f"{name}: {str(error).strip().splitlines()[0]}")
            continue
        if met:
            deviating.append(name)
        else:
            equal += 1
    line = parity_line(equal, len(quantities), deviating)
    print(line)
    record_property("summary_line", line)
    assert not failures, "\n".join(failures)


def test_a_kind_without_a_replay_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The parity test cannot pass over a quantity it does not know."""
    extra = {"kind": "loss_unheard_of", "params": {}, "inputs": {}, "outputs": {"loss": 1.0}}
    monkeypatch.setattr("test_pe_parity.golden", lambda: {"loss/unheard-of": extra})
    with pytest.raises(AssertionError, match="no replay knows kind 'loss_unheard_of'"):
        test_every_golden_quantity_equals_the_reference(lambda *_: None)
