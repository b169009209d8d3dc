"""Calibration data: real text cut into fixed-length token windows.

Every similarity measure and search objective in tailorkit runs the model on
the same small batch of text. That batch must be reproducible (a seed picks
the windows) and must not depend on the network: with no argument a short
public-domain text that ships inside the package is used (Shakespeare's
Sonnets and Julius Caesar, Milton's Areopagitica; see
``scripts/make_calibration_data.py``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch

from tailorkit.errors import CalibrationError

DEFAULT_SEQ_LEN = 128
DEFAULT_NUM_WINDOWS = 16
DEFAULT_BATCH_SIZE = 8  # windows per forward pass
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".text")
MAX_CONTROL_SHARE = 0.05  # of the characters: more, and it is a binary file read as text
MIN_DISTINCT_TOKENS = 8
CONTROL = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")  # Unicode Cc, bar tab, newlines, FF

CalibrationSource = str | Path | Sequence[str] | None


def default_texts() -> list[str]:
    """The public-domain texts bundled with tailorkit, one string per work."""
    folder = resources.files("tailorkit") / "data" / "calibration"
    return [f.read_text(encoding="utf-8") for f in sorted(folder.iterdir(), key=lambda f: f.name)]


def load_texts(source: CalibrationSource = None) -> list[str]:
    """Texts from: None (the bundled default), a list of strings, a text file, a JSONL file
    (one object per line, its ``text`` field), a folder of
    text files (read recursively, in name order), or ``hf:DATASET[:SPLIT[:COLUMN]]`` (a
    Hub dataset; needs the ``datasets`` package and the network)."""
    if source is None:
        return default_texts()
    if isinstance(source, (list, tuple)):
        if not all(isinstance(t, str) for t in source):
            raise CalibrationError("calibration: a list must hold strings of text")
        return list(source)
    text = str(source)
    if text.startswith("hf:"):
        return _hub_dataset(text[3:])
    path = Path(text)
    if path.is_file() and path.suffix == ".jsonl":
        return _jsonl(path)
    if path.is_file():
        return [_read(path)]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise CalibrationError(
                f"calibration folder {path} holds no text files ({', '.join(TEXT_SUFFIXES)})"
            )
        return [_read(p) for p in files]
    raise CalibrationError(
        f"calibration {text!r} is not a file or folder; give a text file, a folder of them, "
        "a list of strings, or hf:DATASET for a Hub dataset"
    )


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"calibration file {path} is not UTF-8 text: {e}") from e


def _jsonl(path: Path) -> list[str]:
    texts = []
    for number, line in enumerate(_read(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{path}, line {number}: not JSON ({e.msg})") from None
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise CalibrationError(
                f'{path}, line {number}: no string field "text" (each line of a JSONL file '
                'is an object like {"text": "..."})'
            )
        texts.append(text)
    if not texts:
        raise CalibrationError(f"{path}: no lines of text")
    return texts


def _hub_dataset(spec: str) -> list[str]:
    name, _, rest = spec.partition(":")
    split, _, column = rest.partition(":")
    try:
        import datasets
    except ImportError as e:
        raise CalibrationError(
            f"calibration hf:{spec} needs the `datasets` package: pip install datasets"
        ) from e
    try:
        saved = Path(name)
        if (saved / "dataset_dict.json").is_file() or (saved / "state.json").is_file():
            data = datasets.load_from_disk(str(saved))  # a folder written by save_to_disk
            if isinstance(data, datasets.DatasetDict):
                data = data[split or "train"]
        else:
            data = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # noqa: BLE001 -- network, auth, unknown name: all the user's to fix
        raise CalibrationError(f"calibration hf:{spec}: could not load the dataset: {e}") from e
    column = column or "text"
    if column not in data.column_names:
        raise CalibrationError(
            f"calibration hf:{spec}: no column {column!r}; columns: {', '.join(data.column_names)}"
        )
    return [t for t in data[column] if isinstance(t, str) and t.strip()]


def text_pieces(text: str, size: int = 16_000) -> list[str]:
    """The text in pieces of about ``size`` characters, cut after a blank line where one is
    near, so tokenizers never see a sequence longer than they were built for."""
    pieces, start = [], 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = text.rfind("\n\n", start, end)
            end = cut + 2 if cut > start else end
        pieces.append(text[start:end])
        start = end
    return pieces


def token_windows(
    tokenizer,
    source: CalibrationSource = None,
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    num_windows: int | None = DEFAULT_NUM_WINDOWS,
    seed: int = 0,
) -> torch.Tensor:
    """``(num_windows, seq_len)`` token ids: the texts joined by EOS, cut into whole
    non-overlapping windows, of which ``num_windows`` are drawn without replacement with
    ``seed`` (all of them, in order, when ``num_windows`` is None)."""
    if seq_len < 2:
        raise CalibrationError(f"seq_len must be at least 2 tokens, got {seq_len}")
    ids: list[int] = []
    for text in _natural(load_texts(source)):
        for piece in text_pieces(text):
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    if len(set(ids)) < MIN_DISTINCT_TOKENS:
        raise CalibrationError(
            f"calibration text has {len(set(ids))} distinct tokens in {len(ids)}: it is not text "
            "a model can be calibrated on (a binary file, or one character repeated?)"
        )
    available = len(ids) // seq_len
    if available == 0:
        raise CalibrationError(
            f"calibration text is too short: {len(ids)} tokens, fewer than one window of "
            f"{seq_len}; give more text or a smaller seq_len"
        )
    windows = torch.tensor(ids[: available * seq_len], dtype=torch.long).view(available, seq_len)
    if num_windows is None:
        return windows
    if num_windows > available:
        raise CalibrationError(
            f"calibration text gives {available} windows of {seq_len} tokens, "
            f"{num_windows} were asked for; give more text or ask for fewer windows"
        )
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))
    return windows[order[:num_windows].sort().values]


def _natural(texts: list[str]) -> list[str]:
    """``texts``, unless control characters (other than newlines and tabs) are a large share
    of them: a binary file read as text, which no method should calibrate on."""
    total = sum(len(t) for t in texts)
    control = sum(len(CONTROL.findall(t)) for t in texts)
    if total and control > MAX_CONTROL_SHARE * total:
        raise CalibrationError(
            f"calibration text is {control / total:.0%} control characters (NUL, ...): a binary "
            "file, not text; give text files"
        )
    return texts


def calibration_windows(
    model_dir: str | Path,
    calibration: CalibrationSource | torch.Tensor = None,
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    num_windows: int | None = DEFAULT_NUM_WINDOWS,
    seed: int = 0,
) -> torch.Tensor:
    """Token windows ``(N, T)``: ``calibration`` itself when it is already a tensor of
    token ids, else text cut with the tokenizer in ``model_dir``."""
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype not in (torch.int64, torch.int32):
            raise CalibrationError(
                f"calibration token ids must be an (N, T) integer tensor, got "
                f"{calibration.dtype} of shape {tuple(calibration.shape)}"
            )
        return calibration.long()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return token_windows(
        tokenizer, calibration, seq_len=seq_len, num_windows=num_windows, seed=seed
    )
