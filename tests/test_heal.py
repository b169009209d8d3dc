"""Healing: the distillation losses against a float64 reference, and `tailorkit heal` end to
end on tiny models (LoRA merged back, full fine-tuning of the gap layers, resume after an
interrupt, the errors that stop a run and what they leave behind)."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import tailorkit as tk
from tailorkit.cli import main
from tailorkit.errors import HealError
from tailorkit.healing.losses import TopKCache, kl_full, kl_top_k, teacher_top_k
from tailorkit.healing.trainer import Trainer

LAYERS = 6
# Layers 3 and 4 are removed: output layers 2 and 3 sit on either side of the gap.
PLAN = [{"from": "base", "layers": [0, 3]}, {"from": "base", "layer": 5}]
FAST = dict(steps=4, seq_len=32, batch_size=2, held_back=2, eval_every=2, checkpoint_every=2)
TEXT = (
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate:\n"
    "Rough winds do shake the darling buds of May, and summer's lease hath all too short "
    "a date.\n"
) * 40


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("heal-data") / "sonnet.txt"
    path.write_text(TEXT)
    return path


def _recipe(tmp_path: Path, base: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    tk.Recipe.from_dict({"models": {"base": str(base)}, "layers": PLAN}).save(path)
    return path


@pytest.fixture(scope="module")
def llama(tiny_model_factory):
    return tiny_model_factory("llama", num_layers=LAYERS)


# --------------------------------------------------------------------------- losses


def _kl64(student, teacher, t=1.0):
    log_q = torch.log_softmax(student.double() / t, -1)
    log_p = torch.log_softmax(teacher.double() / t, -1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean() * t * t)


def test_kl_matches_a_float64_reference(gen):
    student = torch.randn(3, 7, 50, generator=gen) * 3
    teacher = torch.randn(3, 7, 50, generator=gen) * 3
    for t in (1.0, 2.5):
        assert float(kl_full(student, teacher, t)) == pytest.approx(
            _kl64(student, teacher, t), rel=1e-5
        )
        # All of the vocabulary in the top-k: the bucketed KL is the full one.
        top = teacher_top_k(teacher, 50, t)
        assert float(kl_top_k(student, *top, t)) == pytest.approx(
            _kl64(student, teacher, t), rel=1e-4
        )
    # A few tokens and a tail bucket: a lower bound (coarser outcomes lose information).
    top = teacher_top_k(teacher, 5)
    assert 0 < float(kl_top_k(student, *top)) < _kl64(student, teacher)
    assert float(kl_full(teacher, teacher)) == pytest.approx(0, abs=1e-6)


def test_top_k_cache_computes_each_window_once(tmp_path, gen):
    logits = torch.randn(6, 4, 30, generator=gen)
    asked = []

    def compute(rows):
        asked.append(list(rows))
        return teacher_top_k(logits[rows], 3)

    cache = TopKCache(tmp_path / "c", 6, 4, 3)
    first = cache.get([1, 4], compute)
    again = TopKCache(tmp_path / "c", 6, 4, 3).get([4, 1, 2], compute)  # reopened from disk
    assert asked == [[1, 4], [2]]
    direct = teacher_top_k(logits[[4, 1, 2]], 3)
    assert torch.equal(again[0], direct[0]) and torch.equal(again[1], direct[1].int())
    assert torch.equal(first[0], again[0][[1, 0]])


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_heal_a_recipe_with_lora(arch, tiny_model_factory, data, tmp_path):
    base = tiny_model_factory(arch, num_layers=LAYERS)
    recipe = _recipe(tmp_path, base)
    out = tmp_path / "healed"
    result = tk.heal(recipe, data=data, out=out, progress=False, learning_rate=3e-3, **FAST)
    report = json.loads((out / "heal.json").read_text())
    held = report["held_back"]
    assert held["after_kl"] < held["before_kl"], "distillation brought it closer to the teacher"
    assert report["steps"] == 4 and report["tokens_seen"] == 4 * 2 * 32
    assert report["trained_layers"] == [0, 1, 2, 3]
    # A plain checkpoint of the pruned shape: the LoRA was merged, nothing of peft is left.
    unhealed = tk.assemble(tk.Recipe.load(recipe))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4
    saved = load_file(out / "model.safetensors")
    assert set(saved) <= set(unhealed.state_dict()) and not any("lora" in k for k in saved)
    changed = [k for k, v in saved.items() if not torch.equal(v, unhealed.state_dict()[k])]
    assert changed and all(".layers." in k or ".h." in k for k in changed)
    card = (out / "README.md").read_text()
    assert "## Healing" in card and "trained after the recipe" in card
    assert "loss_curve.png" in card and (out / "loss_curve.png").stat().st_size > 1000
    assert tk.Recipe.load(out / "recipe.yaml") == tk.Recipe.load(recipe)
    assert not Path(f"{out}-checkpoints").exists(), "checkpoints removed once the result is saved"
    assert result.model.config.num_hidden_layers == 4


def test_full_fine_tuning_of_the_gap_layers_only(llama, data, tmp_path):
    result = tk.heal(
        _recipe(tmp_path, llama), data=data, full=True, train="gaps", progress=False, **FAST
    )
    assert result.report["trained_layers"] == [2, 3]
    assert result.report["mode"] == "full"
    before = tk.assemble(tk.Recipe.load(tmp_path / "recipe.yaml")).state_dict()
    for name, value in result.model.state_dict().items():
        same = torch.equal(value, before[name])
        in_gap = ".layers.2." in name or ".layers.3." in name
        assert same != in_gap or "norm" in name, name


def test_resume_after_an_interrupt_reaches_the_same_weights(llama, data, tmp_path, monkeypatch):
    recipe = _recipe(tmp_path, llama)
    settings = dict(FAST, steps=6)
    whole = tk.heal(recipe, data=data, progress=False, **settings)

    step = Trainer._one_step

    def interrupted(self, bar):
        if self.step == 5:
            raise KeyboardInterrupt
        step(self, bar)

    monkeypatch.setattr(Trainer, "_one_step", interrupted)
    out = tmp_path / "healed"
    with pytest.raises(KeyboardInterrupt) as e:
        tk.heal(recipe, data=data, out=out, progress=False, **settings)
    assert "checkpoint of step 4 is kept" in e.value.kept and not out.exists()
    assert sorted(p.name for p in Path(f"{out}-checkpoints").iterdir()) == [
        "step-000002",
        "step-000004",
    ]
    monkeypatch.setattr(Trainer, "_one_step", step)
    resumed = tk.heal(recipe, data=data, out=out, resume=True, progress=False, **settings)
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    history = json.loads((out / "heal.json").read_text())["history"]
    assert [h["step"] for h in history] == list(range(7))

    # Another run's checkpoints are refused, naming what differs; a fresh start over them
    # too (they are not deleted unasked).
    tk.heal(recipe, data=data, checkpoints=tmp_path / "ck", progress=False, **FAST)
    with pytest.raises(HealError, match=r"earlier run \(up to step-000004\).*nothing was removed"):
        tk.heal(recipe, data=data, checkpoints=tmp_path / "ck", progress=False, **FAST)
    with pytest.raises(HealError, match="lora_rank"):
        tk.heal(recipe, data=data, checkpoints=tmp_path / "ck", resume=True, lora_rank=4, **FAST)


def test_a_nan_loss_stops_and_keeps_the_last_good_checkpoint(llama, data, tmp_path, monkeypatch):
    loss = Trainer.loss

    def poisoned(self, rows):
        value = loss(self, rows)
        return value * float("nan") if self.step == 2 else value

    monkeypatch.setattr(Trainer, "loss", poisoned)
    out = tmp_path / "healed"
    with pytest.raises(HealError, match=r"loss became nan at step 3; the checkpoint of step 2"):
        tk.heal(_recipe(tmp_path, llama), data=data, out=out, progress=False, **FAST)
    assert not out.exists()
    assert [p.name for p in Path(f"{out}-checkpoints").iterdir()] == ["step-000002"]


def test_a_full_disk_while_checkpointing_leaves_nothing_half_written(
    llama, data, tmp_path, monkeypatch
):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "healed"
    with pytest.raises(HealError, match=r"disk is full\); no checkpoint was written yet"):
        tk.heal(_recipe(tmp_path, llama), data=data, out=out, progress=False, **FAST)
    assert not out.exists() and list(Path(f"{out}-checkpoints").iterdir()) == []


def test_a_teacher_with_another_vocabulary_is_refused(llama, data, tmp_path):
    other = tmp_path / "other-teacher"
    shutil.copytree(llama, other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<extra-token>"])
    tokenizer.save_pretrained(other)
    with pytest.raises(HealError, match="tokenizer is not the student's"):
        tk.heal(_recipe(tmp_path, llama), teacher=other, data=data, progress=False, **FAST)


def test_bad_data_and_settings(llama, data, tmp_path):
    recipe = _recipe(tmp_path, llama)
    nul = tmp_path / "nul.txt"
    nul.write_text("\0" * 5000)
    with pytest.raises(HealError, match="data: .*control characters"):
        tk.heal(recipe, data=nul, progress=False, **FAST)
    with pytest.raises(HealError, match="data: .* windows .* held back"):
        tk.heal(recipe, data=[TEXT[:70]], progress=False, **FAST)
    # Settings are checked before anything is loaded (the model does not exist).
    with pytest.raises(HealError, match="steps"):
        tk.heal(tmp_path / "missing", steps=0)
    with pytest.raises(HealError, match="teacher_cache on needs top_k"):
        tk.heal(tmp_path / "missing", teacher_cache="on")
    with pytest.raises(HealError, match="outside 0..3"):
        tk.heal(recipe, data=data, train="2-9", progress=False, **FAST)


def test_top_k_with_a_cache_on_disk(llama, data, tmp_path):
    folder = tmp_path / "ck"
    settings = dict(FAST, steps=6, top_k=16)
    cached = tk.heal(
        _recipe(tmp_path, llama),
        data=data,
        checkpoints=folder,
        teacher_cache="on",
        progress=False,
        **settings,
    )
    fresh = tk.heal(
        _recipe(tmp_path, llama), data=data, teacher_cache="off", progress=False, **settings
    )
    (cache,) = folder.glob("teacher-top-k-*")
    assert (cache / "filled.u8").read_bytes().count(1) > 0
    for name, value in cached.model.state_dict().items():
        assert torch.allclose(value, fresh.model.state_dict()[name], atol=1e-5), name


def test_data_from_jsonl_and_a_saved_dataset(llama, tmp_path):
    datasets = pytest.importorskip("datasets")
    lines = [json.dumps({"text": TEXT[i * 200 : (i + 1) * 200]}) for i in range(20)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    datasets.Dataset.from_dict({"text": [TEXT]}).save_to_disk(str(tmp_path / "saved"))
    recipe = _recipe(tmp_path, llama)
    for source in (tmp_path / "d.jsonl", f"hf:{tmp_path / 'saved'}"):
        result = tk.heal(recipe, data=source, progress=False, **dict(FAST, steps=1))
        assert result.report["steps"] == 1
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(HealError, match=r"bad\.jsonl, line 2: no string field"):
        tk.heal(recipe, data=tmp_path / "bad.jsonl", progress=False, **FAST)


def test_cli_heal_then_overwrite(llama, data, tmp_path, capsys):
    recipe = _recipe(tmp_path, llama)
    out = tmp_path / "cli-healed"
    args = ["heal", str(recipe), "--data", str(data), "--out", str(out), "-q", "--steps", "2"]
    args += ["--seq-len", "32", "--batch-size", "2", "--held-back", "2", "--lora-rank", "4"]
    assert main(args) == 0
    assert "held-back perplexity" in capsys.readouterr().err
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0, "a previous heal output may be replaced"
    assert main(["heal", str(recipe), "--steps", "0"]) == 2
    assert "steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --full and --lora-rank exclude each other
        main(["heal", str(recipe), "--full", "--lora-rank", "4"])
    assert "not allowed with" in capsys.readouterr().err


def test_prune_then_heal_then_save(llama, data, tmp_path):
    result = tk.prune(
        llama,
        method="shortgpt",
        target_ratio=0.3,
        calibration=data,
        seq_len=32,
        num_windows=4,
        progress=False,
    )
    healed = result.heal(data=data, progress=False, **dict(FAST, steps=2))
    out = healed.save_pretrained(tmp_path / "out")
    assert (out / "recipe.yaml").is_file() and (out / "heal.json").is_file()
    assert (
        AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == result.plan.num_layers
    )
    # The healed model's output follows the umask like a build's (not private files).
    assert all(p.stat().st_mode & 0o044 for p in out.iterdir())


def test_accelerate_launch_on_two_processes_matches_one(llama, data, tmp_path):
    """`accelerate launch` runs the same command over processes (gloo on the CPU): each takes
    its share of every batch, gradients are averaged, one process writes; the weights are
    those of one process taking the whole batch."""
    import subprocess
    import sys

    recipe = _recipe(tmp_path, llama)
    args = ["heal", str(recipe), "--data", str(data), "-q", "--steps", "3", "--seq-len", "32"]
    args += ["--batch-size", "4", "--held-back", "2", "--learning-rate", "0.003"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    two = tmp_path / "two"
    run = subprocess.run(
        [*launch, "-m", "tailorkit.cli", *args, "--out", str(two)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("wrote ") == 1, "one process reports and writes"
    one = tmp_path / "one"
    assert main([*args, "--out", str(one)]) == 0
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    unhealed = tk.assemble(tk.Recipe.load(recipe)).state_dict()
    for name, value in a.items():
        assert torch.allclose(value, b[name], atol=1e-5), name
    assert any(not torch.equal(v, unhealed[k]) for k, v in a.items()), "it trained"
    report = json.loads((two / "heal.json").read_text())
    assert report["tokens_seen"] == 3 * 4 * 32
