"""Inference speed: the timed greedy loop really decodes on the cache, the numbers are sane,
and speed reaches `tailorkit eval --speed`, its JSON, the model card and the benchmark."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_eval import _byte_tokenizer

import tailorkit as tk
from tailorkit import cli
from tailorkit.card import make_model_card
from tailorkit.eval import EvalError, Evaluation, measure_speed, measure_speeds, speed_ratio
from tailorkit.eval.speed import SpeedResult, prompt_ids, timed_greedy

ROOT = Path(__file__).resolve().parent.parent


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def dense_and_pruned(tiny_model_factory, tmp_path_factory) -> tuple[Path, Path]:
    """A tiny 4-layer llama and its first two layers built by tailorkit, both with a
    byte tokenizer (so `tailorkit eval` loads them)."""
    root = tmp_path_factory.mktemp("speed")
    dense = root / "dense"
    shutil.copytree(tiny_model_factory("llama"), dense)
    recipe = tk.Recipe.from_dict(
        {"models": {"m": str(dense)}, "layers": [{"from": "m", "layers": [0, 2]}]}
    )
    pruned = tk.build(recipe, root / "pruned", progress=False)
    for folder in (dense, pruned):
        _byte_tokenizer().save_pretrained(folder)
    return dense, Path(pruned)


# --------------------------------------------------------------------------- the loop


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_decode_steps_use_the_cache(tiny_model_factory, arch):
    """Each decode step feeds one token; only with the prefill's cache do its logits equal
    a full forward's over prompt + generated tokens at the same positions."""
    model = _load(tiny_model_factory(arch))
    ids = prompt_ids(model, 24, batch_size=2, seed=3)  # (2, 24)
    run = timed_greedy(model, ids, 12, keep_logits=True)
    assert run.tokens.shape == (2, 12) and run.logits.shape == (2, 12, 256)
    with torch.no_grad():
        full = model(torch.cat([ids, run.tokens], dim=1)).logits  # (2, 36, V)
    expected = full[:, 23:35].float()  # the positions that chose tokens 0..11
    torch.testing.assert_close(run.logits, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(run.tokens, expected.argmax(-1))  # greedy
    # Without the cache a step sees one token only: different logits, so the check bites.
    with torch.no_grad():
        alone = model(run.tokens[:, :1]).logits[:, -1].float()  # (2, V)
    assert not torch.allclose(alone, run.logits[:, 1], atol=1e-3)


def test_prompt_ids_are_seeded_and_below_the_vocabulary(tiny_model_factory):
    model = _load(tiny_model_factory("llama"))
    a, b = prompt_ids(model, 100, 3, seed=7), prompt_ids(model, 100, 3, seed=7)
    assert torch.equal(a, b) and a.shape == (3, 100)
    assert int(a.min()) >= 0 and int(a.max()) < 256
    assert not torch.equal(a, prompt_ids(model, 100, 3, seed=8))


def test_measure_speed_gives_positive_finite_numbers(tiny_model_factory):
    model = _load(tiny_model_factory("llama")).train()
    s = measure_speed(model, prompt_tokens=32, new_tokens=8, batch_size=2, repeats=3, warmup=1)
    for value in (s.prefill_tokens_per_s, s.decode_tokens_per_s, s.prefill_ms):
        assert math.isfinite(value) and value > 0
    assert s.decode_ms_per_token > 0 and len(s.prefill_runs_ms) == len(s.decode_runs_ms) == 3
    # tokens/s is (batch x tokens) over the median time
    median = sorted(s.prefill_runs_ms)[1]
    assert s.prefill_tokens_per_s == pytest.approx(2 * 32 / (median / 1000))
    assert s.decode_tokens_per_s == pytest.approx(2 / (s.decode_ms_per_token / 1000))
    assert (s.device, s.dtype, s.threads) == ("cpu", "float32", torch.get_num_threads())
    assert s.settings == {"prompt_tokens": 32, "new_tokens": 8, "batch_size": 2,
                          "repeats": 3, "warmup": 1, "seed": 0}  # fmt: skip
    assert model.training, "the model's mode is given back"
    assert SpeedResult.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_speed_settings_are_checked(tiny_model_factory):
    model = _load(tiny_model_factory("llama"))  # 128 positions
    with pytest.raises(EvalError, match=r"= 136 is longer than the model takes \(128 positions\)"):
        measure_speed(model, prompt_tokens=128, new_tokens=8)
    with pytest.raises(EvalError, match="new_tokens must be a whole number >= 1, got 0"):
        measure_speed(model, prompt_tokens=8, new_tokens=0)
    with pytest.raises(EvalError, match="repeats"):
        measure_speeds([model], prompt_tokens=8, new_tokens=2, repeats=0)


def test_speed_ratio():
    dense = {"prefill_tokens_per_s": 100.0, "decode_tokens_per_s": 20.0}
    pruned = {"prefill_tokens_per_s": 150.0, "decode_tokens_per_s": 25.0}
    assert speed_ratio(dense, pruned) == {"prefill": 1.5, "decode": 1.25}
    assert speed_ratio(dense, {"prefill_tokens_per_s": 150.0}) == {"prefill": 1.5, "decode": None}


# --------------------------------------------------------------------------- eval


def test_eval_speed_against_the_dense_model_through_the_cli(dense_and_pruned, tmp_path, capsys):
    dense, pruned = dense_and_pruned
    out = tmp_path / "speed.json"
    argv = ["eval", str(pruned), "--speed", "--compare", str(dense), "--json", str(out),
            "--speed-prompt-tokens", "24", "--speed-new-tokens", "4", "--speed-repeats", "2"]  # fmt: skip
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "tk_next_line" not in captured.err, "--speed alone measures speed only"
    data = json.loads(out.read_text())
    assert data["tasks"] == {} and data["perplexity"] == {}
    speed = data["speed"]
    assert set(speed) == {"model", "base", "speedup"}
    for row in (speed["model"], speed["base"]):
        assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0
        assert row["settings"]["prompt_tokens"] == 24 and row["settings"]["new_tokens"] == 4
        assert len(row["decode_runs_ms"]) == 2
    assert speed["speedup"] == pytest.approx(speed_ratio(speed["base"], speed["model"]))
    up = speed["speedup"]
    table = captured.out
    assert "| speed | tailored | dense | speed-up |" in table
    assert f"| {up['prefill']:.2f}x |" in table and f"| {up['decode']:.2f}x |" in table
    assert "| prefill tokens/s |" in table and "| decode tokens/s |" in table
    assert "a prompt of 1 x 24 random tokens, then 4 tokens decoded" in table
    again = Evaluation.from_dict(data)
    assert again.speed == speed and again.to_dict() == data


def test_eval_speed_of_one_model_beside_its_perplexity(dense_and_pruned, tmp_path):
    _, pruned = dense_and_pruned
    text = tmp_path / "text.txt"
    text.write_text(Path(json.__file__).read_text()[:1000])
    ev = tk.evaluate(
        pruned,
        ppl=[text],
        context_length=64,
        speed=True,
        speed_prompt_tokens=16,
        speed_new_tokens=3,
        speed_repeats=1,
    )
    assert set(ev.speed) == {"model"} and ev.perplexity
    table = ev.table()
    assert "| speed | tokens/s | ms |" in table and "| text.txt | 1000 |" in table
    with pytest.raises(EvalError, match="longer than the model takes"):
        tk.evaluate(pruned, speed=True, speed_prompt_tokens=200)
    with pytest.raises(EvalError, match="speed_new_tokens must be a whole number >= 1"):
        tk.evaluate(pruned, speed=True, speed_new_tokens=0)


# --------------------------------------------------------------------------- card


def _speed(prefill: float, decode: float) -> dict:
    return SpeedResult(
        prefill_tokens_per_s=prefill,
        decode_tokens_per_s=decode,
        prefill_ms=1.0,
        decode_ms_per_token=1.0,
        device="cpu",
        dtype="bfloat16",
        threads=4,
        settings={"prompt_tokens": 512, "new_tokens": 64, "batch_size": 1, "repeats": 3},
    ).to_dict()


def test_card_size_table_shows_measured_speed(family):
    from tailorkit.result import PruneResult

    recipe = tk.Recipe.from_dict(
        {"models": {"m": str(family.base)}, "layers": [{"from": "m", "layers": [0, 3]}]}
    )
    tasks = {"t": {"metric": "acc", "acc": 0.5, "samples": 10}}
    plain = {"model": "out", "tasks": tasks, "baseline": {"model": "base", "tasks": tasks}}
    mine, base = _speed(1310.0, 26.0), _speed(1000.0, 20.0)
    timed = plain | {"speed": {"model": mine, "base": base, "speedup": speed_ratio(base, mine)}}

    text = PruneResult(recipe=recipe, evaluation=timed).model_card().text
    assert "| | base model | this model | removed / speed-up |" in text
    assert "| prefill tokens/s | 1,000.0 | 1,310.0 | 1.31x |" in text
    assert "| decode tokens/s | 20.0 | 26.0 | 1.30x |" in text
    assert "a prompt of 1 x 512 random tokens, then 64 tokens decoded" in text
    assert "cpu, bfloat16, 4 threads" in text
    assert text.count("tokens/s") == 2, "in the size table only, not again under Evaluation"

    for evaluation in (plain, None, plain | {"speed": {"model": mine}}):
        text = make_model_card(recipe.plan(), evaluation=evaluation).text
        assert "| | base model | this model | removed |" in text
        assert "| prefill tokens/s |" not in text and "| decode tokens/s |" not in text


# --------------------------------------------------------------------------- benchmark


def test_speed_benchmark_runs_end_to_end(dense_and_pruned, tmp_path):
    dense, pruned = dense_and_pruned
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "speed_of_pruned.py"),
           "--dense", str(dense), "--pruned", str(pruned), "--prompt-tokens", "16",
           "--new-tokens", "4", "--repeats", "2", "--threads", "1", "--json", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "| dense | " in done.stdout and "| pruned | " in done.stdout
    data = json.loads(out.read_text())
    assert data["benchmark"] == "speed_of_pruned" and data["threads"] == 1
    dense_row, pruned_row = data["models"]
    assert (dense_row["layers"], pruned_row["layers"]) == (4, 2)
    assert dense_row["parameters"] > pruned_row["parameters"]
    assert dense_row["intermediate_size"] == pruned_row["intermediate_size"] == 128
    assert dense_row["speedup"] == {"prefill": 1.0, "decode": 1.0}
    assert pruned_row["speed"]["decode_tokens_per_s"] > 0 and pruned_row["speedup"]["decode"] > 0


def test_evaluate_records_speed_on_a_prune_result_and_its_card_shows_it(dense_and_pruned, tmp_path):
    """tk.prune(...) with width, then tk.evaluate(result, compare=BASE, speed=True): the
    result keeps the evaluation, and its saved card's size table shows the kept MLP
    channels and the measured speed beside the dense model's."""
    dense, _ = dense_and_pruned
    ids = torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(5))
    result = tk.prune(
        dense,
        method="shortgpt",
        target_ratio=0.3,
        width_share=1.0,
        calibration=ids,
        batch_size=4,
        progress=False,
    )
    assert result.evaluation is None
    evaluation = tk.evaluate(
        result, compare=dense, speed=True, speed_prompt_tokens=16, speed_new_tokens=4
    )
    assert result.evaluation == evaluation.to_dict()
    out = result.save_pretrained(tmp_path / "out")
    card = (out / "README.md").read_text()
    keep = result.recipe.width.intermediate_size
    assert f"| MLP channels per layer | 128 | {keep} | {128 - keep} (" in card
    assert "| prefill tokens/s |" in card and "| decode tokens/s |" in card
    assert f"each keeping {keep} of its 128 MLP channels" in card
