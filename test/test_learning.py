"""rafale learns as well as an independent reference: `rafale -c pythia_debug.yaml` against transformers'
GPTNeoXForCausalLM trained by a plain PyTorch loop with the same recipe, data, batch order and steps
(bench/learning.py, which also runs the comparison on the default config)."""

import sys

import pytest

from conftest import ROOT

pytest.importorskip("transformers")
sys.path.insert(0, str(ROOT / "bench"))  # as test_learning_mlm.py does (`bench` alone would name bench/bench.py)
import learning  # noqa: E402


def test_decoder_learns_as_well_as_transformers(tmp_path, cache_dir, capsys):
    # one evaluation at the end (besides rafale's at the start): evaluations do not change the training
    ours, reference = learning.compare(
        ROOT / "test" / "pythia_debug.yaml", tmp_path, training={"eval_interval": "40ba", "save_interval": "40ba"}
    )
    # both losses fell well below the uniform guess over the 500-token vocabulary (ln 500 = 6.2): a run that
    # learned nothing on both sides cannot pass
    assert reference < 5.0
    assert ours <= reference * learning.TOLERANCE, f"rafale {ours:.4f} vs transformers {reference:.4f}"


def test_muon_trains_exactly_as_the_reference_loop_from_the_same_weights(tmp_path, cache_dir, capsys):
    """The default job's optimizer: rafale's Muon (its parameter groups, learning rates and schedule) against
    pytorch-optimizer's Muon grouped independently from HF's parameter names in the plain loop, from the same
    initial weights: the same final loss, not only a loss within seed noise."""
    ours, reference = learning.compare(
        ROOT / "test" / "pythia_debug.yaml", tmp_path, same_init=True,
        training={"eval_interval": "40ba", "save_interval": "40ba", "optimizer": {"name": "muon"}},
    )
    assert reference < 5.0
    assert abs(ours - reference) < 1e-3, f"rafale {ours:.5f} vs the reference loop {reference:.5f}"
