"""Bad input met before the work, as one message and status 2: truncated checkpoints in
every command that opens one, output paths checked first, numeric options in range,
settings checked before calibration, calibration text that is not text; and no scratch
folder left behind by tk.prune."""

from __future__ import annotations

import gc
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

import tailorkit as tk
from tailorkit.cli import main as cli
from tailorkit.errors import CalibrationError


@pytest.fixture
def truncated(tiny_model_factory, tmp_path) -> Path:
    folder = Path(shutil.copytree(tiny_model_factory("llama"), tmp_path / "cut"))
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-5])
    return folder


@pytest.mark.parametrize(
    "command",
    [
        ["eval", "--ppl", "text.txt"],
        ["generate"],
        ["cka", "--calibration", "text.txt", "--num-windows", "4"],
    ],
)
def test_a_truncated_checkpoint_is_one_message(truncated, tmp_path, capsys, command):
    (tmp_path / "text.txt").write_text("Fair is foul, and foul is fair. " * 50)
    args = [
        command[0],
        str(truncated),
        *[str(tmp_path / a) if a.endswith(".txt") else a for a in command[1:]],
    ]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "Traceback" not in err


def test_output_paths_are_checked_before_the_work(tiny_model_factory, tmp_path, capsys):
    model = str(tiny_model_factory("llama"))
    assert cli(["eval", model, "--json", str(tmp_path / "nodir" / "x.json")]) == 2
    assert "--json" in capsys.readouterr().err
    assert cli(["cka", model, "--plot", str(tmp_path / "nodir" / "c.png")]) == 2
    assert "--plot" in capsys.readouterr().err
    args = ["prune", "--base", model, "--method", "shortgpt", "--target-ratio", "0.3"]
    assert cli([*args, "--recipe", str(tmp_path / "nodir" / "r.yaml")]) == 2


@pytest.mark.parametrize(
    "args, option",
    [
        (["cka", "--num-windows", "-3"], "--num-windows"),
        (["cka", "--num-windows", "0"], "--num-windows"),
        (["cka", "--seq-len", "1"], "--seq-len"),
        (["eval", "m", "--limit", "0"], "--limit"),
        (["eval", "m", "--stride", "0"], "--stride"),
        (["generate", "m", "--max-new-tokens", "0"], "--max-new-tokens"),
    ],
)
def test_numeric_options_out_of_range_name_the_option(args, option, capsys):
    with pytest.raises(SystemExit) as e:
        cli(args)
    assert e.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err


@pytest.mark.parametrize("ratio", ["0", "1.0", "-0.1"])
def test_settings_are_refused_before_calibration(tiny_model_factory, monkeypatch, capsys, ratio):
    from tailorkit.trials import TrialRunner

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated before checking the settings")

    monkeypatch.setattr(TrialRunner, "calibrate", no_calibration)
    model = str(tiny_model_factory("llama"))
    assert cli(["prune", "--base", model, "--method", "shortgpt", "--target-ratio", ratio]) == 2
    assert "target_ratio" in capsys.readouterr().err


def test_calibration_text_that_is_not_text_is_refused(tiny_model_factory, tmp_path):
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"\0" * 100_000)
    model = str(tiny_model_factory("llama"))
    with pytest.raises(CalibrationError, match="control characters"):
        tk.prune(model, method="shortgpt", target_ratio=0.3, calibration=str(nul), progress=False)
    from tailorkit.calibration import token_windows

    class Tokenizer:  # one token repeated: what a file of one character gives
        eos_token_id = None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [7] * len(text)}

    with pytest.raises(CalibrationError, match="1 distinct tokens"):
        token_windows(Tokenizer(), ["aaaa" * 1000], seq_len=16, num_windows=4)


def test_the_pickle_message_names_no_command_that_does_not_exist(tiny_model_factory, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copyfile(tiny_model_factory("llama") / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(tk.TailorkitError) as e:
        tk.Recipe.identity(str(folder), 4).plan()
    assert "pickle" in str(e.value) and "tailorkit convert" not in str(e.value)


def test_prune_leaves_no_scratch_folder(tiny_model_factory, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    tokens = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    model = str(tiny_model_factory("llama"))
    result = tk.prune(
        model, method="shortgpt", target_ratio=0.3, calibration=tokens, progress=False
    )
    image = next(iter(result.images.values()))
    assert image.is_file()  # the figures live as long as the result
    del result
    gc.collect()
    assert not any(p.name.startswith("tailorkit-prune-") for p in tmp_path.iterdir())
    with pytest.raises(tk.TailorkitError):  # a method that fails leaves nothing either
        tk.prune(
            model, method="laco", target_ratio=0.3, calibration=tokens, progress=False, lowest=3
        )
    gc.collect()
    assert not any(p.name.startswith("tailorkit-") for p in tmp_path.iterdir())
