"""`python -m fastopt demo` end to end at its test-only "tiny" size (`--tiny`, hidden from --help;
seconds on the CPU): the table, the figure, the agreement of torch's and fastopt's AdamW, and
the message when the demo's packages are missing."""

from __future__ import annotations

import sys

import pytest
import torch

import fastopt.demo
from fastopt.__main__ import main
from fastopt.demo import variants


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return fastopt.demo.run(fastopt.demo.PRESETS["tiny"], "cpu", 0, out, progress=False), out


def test_the_optimizers_train_the_same_network_to_the_same_losses(tiny):
    result, _ = tiny
    reference = result.runs[variants.REFERENCE].losses
    assert len(reference) > 1 and reference[-1] < reference[0]  # it learned
    fp32 = [o.name for o in variants.OPTIMIZERS if o.param_dtype == torch.float32]
    assert variants.SOURCE in fp32
    for name in fp32:
        assert len(result.runs[name].losses) == len(reference), name
        # fp32 twins of one update rule differ by rounding only. The bound is tight enough to
        # fail a changed beta2 (0.999 -> 0.99) or a doubled weight decay in these few steps:
        # those move the loss by 5 and 1.6 times the bound.
        assert result.max_loss_difference(name) <= 1e-6 * max(reference), name


def test_every_variant_has_a_row_with_its_accuracy_and_latency(tiny):
    result, _ = tiny
    settings = result.settings
    expected = [("dense", o.name) for o in variants.OPTIMIZERS] + [
        (v.label(settings), None) for v in variants.MODEL_VARIANTS
    ]
    assert [(r.model, r.trained_with if r.model == "dense" else None) for r in result.rows] == (
        expected
    )
    for row in result.rows:
        assert 0.0 <= row.accuracy <= 1.0 and row.latency_ms > 0, row
        assert row.model in result.table


def test_the_block_sparse_and_int8_rows_hold_fastopt_layers(tiny):
    """The converted models really are made of fastopt's layers (and the pruned model keeps the
    requested fraction of blocks)."""
    result, _ = tiny
    settings = result.settings
    for variant in variants.MODEL_VARIANTS:
        dense = fastopt.demo.training.make_model(settings.hidden)
        model = variants.convert(variant, dense, settings)
        layers = [m for m in model.modules() if type(m).__module__.startswith("fastopt.nn")]
        assert layers, variant.name
        for layer in layers:
            if isinstance(layer, fastopt.nn.BlockSparseLinear):
                assert layer.density == pytest.approx(settings.density)


def test_the_figure_and_the_table_are_written(tiny):
    result, out = tiny
    assert result.figure == out / "fastopt-demo.png"
    assert result.figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "fastopt-demo.md").read_text().strip() == result.table


def test_the_command_prints_the_table_and_the_figure_path(tmp_path, capsys):
    assert main(["demo", "--tiny", "--device", "cpu", "--out", str(tmp_path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"figure: {tmp_path / 'fastopt-demo.png'}" in printed
    assert "| model | trained with | test accuracy |" in printed
    assert (tmp_path / "fastopt-demo.png").exists()


def test_without_the_demo_packages_it_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn` now fails
    assert main(["demo", "--tiny", "--out", str(tmp_path)]) == 1
    message = capsys.readouterr().err
    assert "python -m fastopt demo needs scikit-learn" in message
    assert "pip install scikit-learn" in message and '".[demo]"' in message
    assert not (tmp_path / "fastopt-demo.png").exists()
