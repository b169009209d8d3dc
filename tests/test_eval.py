"""Evaluation: perplexity (sliding windows), lm-eval tasks on a model in memory, retention.

Tiny models get a byte-level tokenizer (their vocabulary is exactly 256), so real text
runs through them; the texts are Python standard-library files and tailorkit's own
shipped task data.  SmolLM2 (slow) checks the comparison against the dense model.
"""

from __future__ import annotations

import json
import math
import shutil
import textwrap
from pathlib import Path

import pytest
import torch

import tailorkit as tk
from tailorkit import cli
from tailorkit.errors import CheckpointError
from tailorkit.eval import EvalError, Evaluation, evaluate, perplexity, sliding_windows
from tailorkit.eval.perplexity import tokenize
from tailorkit.eval.tasks import TASKS_DIR, builtin_tasks

TEXT = Path(textwrap.__file__)  # a real text file on every machine


def _byte_tokenizer():
    """A byte-level fast tokenizer: id = byte value; BOS 1, EOS 2, PAD 0 (tiny configs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    extra = iter(range(256, 512))
    chars = {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}
    tok = Tokenizer(models.BPE(vocab={c: b for b, c in chars.items()}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=chars[1], eos_token=chars[2], pad_token=chars[0]
    )


@pytest.fixture
def one_thread():
    """Tiny models are latency-bound: one thread is fastest, and immune to busy neighbours."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tiny_model_factory, tmp_path_factory) -> Path:
    """A tiny llama with a byte tokenizer, as a checkpoint directory."""
    out = tmp_path_factory.mktemp("eval") / "tiny-llama"
    shutil.copytree(tiny_model_factory("llama"), out)
    _byte_tokenizer().save_pretrained(out)
    return out


# --------------------------------------------------------------------------- windows


def test_sliding_windows_documented_example():
    windows = sliding_windows(10, 4, 2)
    assert [(w.begin, w.end, w.first) for w in windows] == [
        (0, 4, 1),
        (2, 6, 4),
        (4, 8, 6),
        (6, 10, 8),
    ]


@pytest.mark.parametrize("n", [2, 5, 16, 17, 100, 257])
@pytest.mark.parametrize("context, stride", [(4, 1), (4, 3), (8, 7), (16, 5), (16, 15), (2, 1)])
def test_sliding_windows_score_every_token_once(n, context, stride):
    windows = sliding_windows(n, context, stride)
    scored = [t for w in windows for t in range(w.first, w.end)]
    assert scored == list(range(1, n)), "each token but the prefix, once, in order"
    for i, w in enumerate(windows):
        assert 0 < w.end - w.begin <= context and w.begin < w.first
        if i > 0:  # later windows give every scored token at least context - stride of context
            assert w.first - w.begin >= context - stride


def test_sliding_windows_bad_settings():
    with pytest.raises(EvalError, match=r"stride must be between 1 and context_length - 1 \(7\)"):
        sliding_windows(100, 8, 8)
    with pytest.raises(EvalError, match="stride"):
        sliding_windows(100, 8, 0)
    with pytest.raises(EvalError, match="at least 2"):
        sliding_windows(100, 1, 1)


# --------------------------------------------------------------------------- perplexity


@torch.no_grad()
def _reference_nll(model, ids: list[int], context: int, stride: int) -> float:
    """Every token scored from its own forward pass in float64, the window chosen by formula."""
    model = model.double()
    total = 0.0
    for t in range(1, len(ids)):
        k = 0 if t < context else (t - context) // stride + 1  # first window holding t
        prefix = torch.tensor([ids[k * stride : t]])
        logp = torch.log_softmax(model(prefix).logits[0, -1], dim=-1)
        total -= logp[ids[t]].item()
    return total / (len(ids) - 1)


def test_perplexity_matches_float64_reference(tiny, one_thread, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = tmp_path / "sample.txt"
    text.write_text(TEXT.read_text()[:300])
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny)
    result = perplexity(model, tok, text, context_length=32, stride=12, batch_size=3)
    ids, prefix = tokenize(text.read_text(), tok)
    assert prefix == 1 and result.tokens == len(ids) - 1 == 300  # ASCII: one token per byte
    assert result.windows == len(sliding_windows(len(ids), 32, 12))
    expected = _reference_nll(model, ids, 32, 12)
    assert result.nll == pytest.approx(expected, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(expected * 300 / math.log(2) / 300, rel=1e-5)
    # Nearly disjoint windows give less context to most tokens: a different number.
    disjoint = perplexity(model.float(), tok, text, context_length=32, stride=31)
    assert disjoint.nll == pytest.approx(_reference_nll(model, ids, 32, 31), rel=1e-5)
    assert abs(disjoint.nll - result.nll) > 1e-4


def test_evaluate_perplexity_through_the_api_and_cli(tiny, one_thread, tmp_path, capsys):
    text = tmp_path / "textwrap.txt"
    text.write_text(TEXT.read_text()[:2000])
    ev = evaluate(tiny, ppl=[text], context_length=64, stride=32)
    row = ev.perplexity[str(text)]
    assert row["context_length"] == 64 and row["stride"] == 32 and row["tokens"] == 2000
    assert 1 < row["perplexity"] < 1000
    out = tmp_path / "ev.json"
    assert cli.main(["eval", str(tiny), "--ppl", str(text), "--context-length", "64",
                     "--stride", "32", "--json", str(out)]) == 0  # fmt: skip
    data = json.loads(out.read_text())
    assert data["perplexity"][str(text)]["perplexity"] == pytest.approx(row["perplexity"])
    assert "| textwrap.txt | 2000 | 64 / 32 |" in capsys.readouterr().out


def test_recipe_and_prune_result_are_evaluated_in_memory(
    tiny, one_thread, tiny_model_factory, tmp_path
):
    from tailorkit.result import PruneResult

    text = tmp_path / "text.txt"
    text.write_text(TEXT.read_text()[:3000])

    base = tiny_model_factory("llama")
    whole = tk.Recipe.from_dict(
        {"models": {"m": str(base)}, "layers": [{"from": "m", "layers": [0, 4]}]}
    )
    short = tk.Recipe.from_dict(
        {"models": {"m": str(base)}, "layers": [{"from": "m", "layers": [0, 2]}]}
    )
    kw = dict(ppl=[text], context_length=64, stride=48, tokenizer=tiny)
    reference = evaluate(tiny, **kw).perplexity[str(text)]["perplexity"]
    assert evaluate(whole, **kw).perplexity[str(text)]["perplexity"] == pytest.approx(reference)
    pruned = evaluate(PruneResult(recipe=short), compare=tiny, **kw)
    assert pruned.model.startswith("recipe ")
    ratio = pruned.retention()["perplexity"][str(text)]["ratio"]
    assert ratio != pytest.approx(1.0)  # two layers fewer: another model


def test_text_shorter_than_one_window(tiny, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be, that is the question.")
    with pytest.raises(EvalError, match=r"short\.txt: 43 tokens, shorter than one window of 64"):
        evaluate(tiny, ppl=[short], context_length=64)
    assert cli.main(["eval", str(tiny), "--ppl", str(short), "--context-length", "64"]) == 2
    err = capsys.readouterr().err
    assert "short.txt" in err and "--context-length 43 or less" in err


def test_bad_text_files(tiny, tmp_path):
    with pytest.raises(EvalError, match="missing.txt: no such text file"):
        evaluate(tiny, ppl=[tmp_path / "missing.txt"])
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\x00\xff\xfe" * 50)
    with pytest.raises(EvalError, match="weights.bin: not UTF-8"):
        evaluate(tiny, ppl=[binary])
    with pytest.raises(EvalError, match="longer than the model takes"):
        evaluate(tiny, ppl=[TEXT], context_length=4096)
    with pytest.raises(EvalError, match="nothing to evaluate"):
        evaluate(tiny)


# --------------------------------------------------------------------------- checkpoints


def test_folder_that_is_not_a_checkpoint(tiny, tmp_path, capsys):
    empty = tmp_path / "notes"
    empty.mkdir()
    (empty / "README.md").write_text("# not a model\n")
    with pytest.raises(CheckpointError, match=r"notes: not a model checkpoint \(no config.json\)"):
        evaluate(empty, ppl=[TEXT])
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="only pickle weights.*does not load"):
        evaluate(pickled, ppl=[TEXT])
    assert cli.main(["eval", str(empty), "--ppl", str(TEXT)]) == 2
    assert "not a model checkpoint" in capsys.readouterr().err


# --------------------------------------------------------------------------- tasks


def test_shipped_task_suite_is_complete():
    assert {"tk_next_line", "tk_next_line_code", "tk_next_line_prose", "tk_next_line_verse"} <= set(
        builtin_tasks()
    )
    size = sum(p.stat().st_size for p in TASKS_DIR.iterdir() if p.is_file())
    assert size < 1_000_000
    manifest = json.loads((TASKS_DIR / "MANIFEST.json").read_text())
    for task in ("tk_next_line_code", "tk_next_line_prose", "tk_next_line_verse"):
        rows = [json.loads(line) for line in (TASKS_DIR / f"{task}.jsonl").open()]
        assert len(rows) == manifest["items_per_task"] == 300
        golds = [r["gold"] for r in rows]
        assert set(golds) == {0, 1, 2, 3} and max(golds.count(g) for g in range(4)) < 0.35 * 300
        for r in rows:
            choices = [c.strip() for c in r["choices"]]
            assert len(choices) == 4 == len(set(choices)), r["id"]
            assert r["query"].strip()
            assert all(c not in r["query"] for i, c in enumerate(choices) if i != r["gold"])


def test_unknown_task_lists_close_matches(tiny, capsys):
    with pytest.raises(
        EvalError, match=r"unknown task 'tk_next_line_vers'; did you mean .*tk_next_line_verse"
    ):
        evaluate(tiny, tasks=["tk_next_line_vers"])
    assert cli.main(["eval", str(tiny), "--tasks", "hellaswagg"]) == 2
    assert "did you mean hellaswag" in capsys.readouterr().err


def _user_task(folder: Path) -> None:
    """A user's local task: YAML + JSON data, exactly what lm-eval documents."""
    folder.mkdir()
    docs = [
        {"ctx": "def add(a, b):\n    return", "choices": [" a + b", " a - b"], "label": 0},
        {"ctx": "import os\nos.path.join", "choices": ["('a', 'b')", "}{"], "label": 0},
        {"ctx": "for i in range(3):\n   ", "choices": [" print(i)", " ]]]"], "label": 0},
    ]
    (folder / "docs.json").write_text(json.dumps(docs))
    (folder / "my_code_task.yaml").write_text(
        textwrap.dedent(
            f"""\
            task: my_code_task
            dataset_path: json
            dataset_kwargs:
              data_files:
                test: {folder / "docs.json"}
            test_split: test
            output_type: multiple_choice
            doc_to_text: "{{{{ctx}}}}"
            doc_to_choice: choices
            doc_to_target: label
            target_delimiter: ""
            metric_list:
              - metric: acc
            """
        )
    )


@torch.no_grad()
def _choice_logprob(model, tok, context: str, continuation: str) -> float:
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    # lm-eval keeps the last max_length + 1 tokens (the tiny model takes 128 positions)
    # and feeds all but the last one.
    full = (ctx + cont)[-129:]
    logp = torch.log_softmax(model(torch.tensor([full[:-1]])).logits[0].double(), dim=-1)
    start = len(full) - len(cont) - 1
    return sum(logp[start + i, c].item() for i, c in enumerate(cont))


def test_lm_eval_tasks_on_a_tiny_model_end_to_end(tiny, one_thread, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _user_task(tmp_path / "mytasks")
    out = tmp_path / "tasks.json"
    argv = ["eval", str(tiny), "--tasks", "tk_next_line_code,my_code_task", "--limit", "6",
            "--task-path", str(tmp_path / "mytasks"), "--json", str(out), "--batch-size", "4"]  # fmt: skip
    assert cli.main(argv) == 0
    table = capsys.readouterr().out
    data = json.loads(out.read_text())
    code = data["tasks"]["tk_next_line_code"]
    assert code["samples"] == 6 and code["metric"] == "acc_norm"
    assert {"acc", "acc_norm", "acc_stderr"} <= set(code)
    assert data["tasks"]["my_code_task"]["samples"] == 3
    assert "| tk_next_line_code | acc_norm | 6 |" in table

    # lm-eval's numbers are the model's: recompute acc and acc_norm from log-likelihoods.
    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    tok = AutoTokenizer.from_pretrained(tiny)
    rows = [json.loads(line) for line in (TASKS_DIR / "tk_next_line_code.jsonl").open()][:6]
    acc = acc_norm = 0
    for r in rows:
        lls = [_choice_logprob(model, tok, r["query"], "\n" + c) for c in r["choices"]]
        acc += max(range(4), key=lambda i: lls[i]) == r["gold"]
        acc_norm += max(range(4), key=lambda i: lls[i] / len(r["choices"][i])) == r["gold"]
    assert code["acc"] == pytest.approx(acc / 6)
    assert code["acc_norm"] == pytest.approx(acc_norm / 6)


def test_retention_arithmetic():
    dense = Evaluation(
        "dense",
        tasks={
            "a": {"metric": "acc_norm", "acc_norm": 0.5, "samples": 10},
            "b": {"metric": "acc", "acc": 0.8, "samples": 10},
        },
        perplexity={"t.txt": {"perplexity": 10.0, "tokens": 5, "context_length": 4, "stride": 2}},
    )
    tailored = Evaluation(
        "tailored",
        tasks={
            "a": {"metric": "acc_norm", "acc_norm": 0.45, "samples": 10},
            "b": {"metric": "acc", "acc": 0.6, "samples": 10},
        },
        perplexity={"t.txt": {"perplexity": 12.5, "tokens": 5, "context_length": 4, "stride": 2}},
        baseline=dense,
    )
    r = tailored.retention()
    assert r["tasks"]["a"]["retention"] == pytest.approx(0.9)
    assert r["tasks"]["b"]["retention"] == pytest.approx(0.75)
    assert r["average"]["retention"] == pytest.approx(0.525 / 0.65)
    assert r["average"]["mean_task_retention"] == pytest.approx(0.825)
    assert r["perplexity"]["t.txt"]["ratio"] == pytest.approx(1.25)
    again = Evaluation.from_dict(json.loads(tailored.to_json()))
    assert again.to_dict() == tailored.to_dict()
    assert "| **average** (2 tasks) | | | 0.5250 | 0.6500 | **80.8%** |" in tailored.table()
    # A lower-is-better task metric is inverted and kept out of the average.
    ppl_task = {"metric": "word_perplexity", "higher_is_better": False, "samples": 3}
    dense.tasks["wiki"] = {**ppl_task, "word_perplexity": 20.0}
    tailored.tasks["wiki"] = {**ppl_task, "word_perplexity": 25.0}
    r = tailored.retention()
    assert r["tasks"]["wiki"]["retention"] == pytest.approx(0.8)
    assert r["average"]["tasks"] == 2 and r["average"]["retention"] == pytest.approx(0.525 / 0.65)
    assert "| wiki | word_perplexity | 3 | 25.0000 | 20.0000 | 80.0% |" in tailored.table()


# --------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_compare_retention_on_smollm2(smollm2_path, tmp_path, capsys):
    text = tmp_path / "textwrap.txt"
    text.write_text(TEXT.read_text()[:6000])
    recipe = Path(__file__).resolve().parent.parent / "examples" / "smollm2-stitch.yaml"
    out = tmp_path / "eval.json"
    argv = ["eval", str(recipe),  # 22 of 30 layers, assembled in memory
            "--ppl", str(text), "--tasks", "tk_next_line_verse", "--limit", "12",
            "--context-length", "512", "--stride", "256",
            "--compare", str(smollm2_path), "--json", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    table = capsys.readouterr().out
    ev = Evaluation.from_dict(json.loads(out.read_text()))
    assert ev.baseline is not None and ev.baseline.model == str(smollm2_path)
    t, d = ev.perplexity[str(text)], ev.baseline.perplexity[str(text)]
    assert t["tokens"] == d["tokens"] and t["context_length"] == d["context_length"] == 512
    assert 1 < d["perplexity"] < t["perplexity"] < 1000  # removing 8 layers costs something
    r = ev.retention()
    row = r["tasks"]["tk_next_line_verse"]
    assert row["tailored"] == ev.tasks["tk_next_line_verse"]["acc_norm"]
    assert row["dense"] == ev.baseline.tasks["tk_next_line_verse"]["acc_norm"]
    if row["dense"] > 0:
        assert row["retention"] == pytest.approx(row["tailored"] / row["dense"])
        assert f"| {100 * row['retention']:.1f}% |" in table
    assert r["perplexity"][str(text)]["ratio"] == pytest.approx(t["perplexity"] / d["perplexity"])
    assert json.loads(out.read_text())["retention"] == r
    assert "| **average** (1 task) |" in table and "| textwrap.txt | " in table
