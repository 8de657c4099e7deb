"""Every example and the demo run, with short settings; their outputs say what they claim."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_example_is_tested():
    tested = {
        "swim_init_finetune",
        "monitor_existing_module",
        "lazy_vs_rich",
        "pairs_2d_regression",
        "rebuild_without_lightning",
        "mnist1d_cnn_vs_mlp",  # in test_conv.py
    }
    assert {p.stem for p in EXAMPLES.glob("*.py")} == tested


def test_swim_init_finetune(capsys):
    history = load_example("swim_init_finetune").main(["--epochs", "1", "--width", "64"])
    assert len(history["swim"]) == 2 and len(history["default"]) == 2
    assert history["swim"][0] > 0.85 > history["default"][0]  # before any training step
    assert history["kept"][0] == 1.0 and history["cost"][0] < 1e-6  # SWIM neurons map back to their pairs
    assert "on its 1st pair" in capsys.readouterr().out


def test_monitor_existing_module(tmp_path, capsys):
    history = load_example("monitor_existing_module").main(
        ["--epochs", "2", "--probe-size", "64", "--logdir", str(tmp_path)]
    )
    assert [r.step for r in history] == [0, 44]
    assert list(history[-1].maps) == ["body.0", "body.2"]
    assert "tensorboard --logdir" in capsys.readouterr().out


def test_lazy_vs_rich(tmp_path, capsys):
    results = load_example("lazy_vs_rich").main(["--steps", "60", "--points", "200", "--logdir", str(tmp_path)])
    rich, lazy = results[0.1], results[100.0]
    assert [r["step"] for r in rich] == [0, 20, 40, 60]
    assert rich[-1]["moved"] > 10 * lazy[-1]["moved"]  # large alpha: the weights barely move
    assert rich[0]["same_pairs"] == lazy[0]["same_pairs"] == 1.0  # the initial map against itself
    assert lazy[-1]["same_pairs"] > 0.9 > 0.5 > rich[-1]["same_pairs"]  # the lazy map stays the initial map
    assert rich[-1]["fidelity"] > rich[-1]["random_pairs"] + 0.2  # the rich layer's pairs rebuild the model
    assert lazy[-1]["f_fidelity"] > lazy[-1]["f_random_pairs"] + 0.2  # the lazy layer's pairs rebuild f
    out = capsys.readouterr().out
    assert "pair cost" in out and "random pairs" in out and "chance" in out


def test_pairs_2d_regression(tmp_path, monkeypatch):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    logs = tmp_path / "logs"
    history = load_example("pairs_2d_regression").main(["--epochs", "4", "--every", "2", "--logdir", str(logs)])
    assert [r.step for r in history] == [0, 16, 32]
    assert len(list((logs / "pairs_2d" / "version_0" / "png").glob("pairs_step*.png"))) == 3
    assert not list((tmp_path / "cwd").iterdir())  # nothing written into the working directory


def test_rebuild_without_lightning(capsys):
    out = load_example("rebuild_without_lightning").main(["--epochs", "5", "--width", "32"])
    assert 0 <= out["keep"] <= 1 and out["refit"] >= out["keep"] - 0.05
    assert "output layer refit" in capsys.readouterr().out


def test_demo_cli(tmp_path, capsys):
    from lightning_swim.cli import main

    assert (
        main(
            [
                "demo",
                "--logdir",
                str(tmp_path),
                "--epochs",
                "1",
                "--every",
                "1",
                "--probe-size",
                "64",
                "--widths",
                "32",
                "16",
                "--quiet",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "tensorboard --logdir" in out and "Sinkhorn div." in out and "net.0" in out and "net.2" in out
    # TensorBoard is pointed at the logger's root, so that it names the run (a run folder itself shows as ".")
    assert f"tensorboard --logdir {tmp_path.resolve()}\n(this run is 'demo/version_0' there)" in out
    assert "Spearman correlation" in out and "EL2N" in out and "TracIn" in out  # the influence baselines beside
    assert list(tmp_path.rglob("events.out.tfevents.*"))
    assert list(tmp_path.rglob("map_step*.npz"))


def test_cli_needs_a_command():
    from lightning_swim.cli import main

    with pytest.raises(SystemExit):
        main([])
