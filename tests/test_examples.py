"""Every example and the demo run, with short settings."""

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


def test_swim_init_finetune(capsys):
    history = load_example("swim_init_finetune").main(["--epochs", "2", "--width", "64"])
    assert len(history["swim"]) == 3 and len(history["default"]) == 3
    assert history["swim"][0] > 0.85 > history["default"][0]  # before any training step
    assert "SWIM init" in capsys.readouterr().out


def test_demo_cli(tmp_path, capsys):
    from lightning_swim.cli import main

    assert main(["demo", "--logdir", str(tmp_path), "--epochs", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "tensorboard --logdir" in out
    assert list(tmp_path.rglob("events.out.tfevents.*"))


def test_cli_needs_a_command():
    from lightning_swim.cli import main

    with pytest.raises(SystemExit):
        main([])
