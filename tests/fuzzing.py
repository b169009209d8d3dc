"""Fuzz targets shared by tests/test_fuzz.py (hypothesis, a few hundred inputs each) and
benchmarks/fuzz.py (a fixed, large number of inputs each).

Each target takes raw input bytes and checks one property: the parser either accepts
the input or raises tailorkit's own error type (``TailorkitError``), never another
exception, within a time limit, and — for the safetensors header — never asks the
file for a byte past its end (every ``read`` is checked against the file size, so a
length field that lies cannot make the parser allocate or read what is not there).

Inputs are made by mutating valid seeds with a ``random.Random``: hypothesis drives
that generator in the tests (``st.randoms``), a plain seeded one drives the benchmark,
so both run the same mutations.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import random
import signal
import struct
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from safetensors.torch import save

from tailorkit.checkpoint import safetensors_format
from tailorkit.checkpoint.safetensors_format import DTYPES, Header, itemsize, read_header
from tailorkit.errors import TailorkitError
from tailorkit.recipe import Recipe

TIME_LIMIT_S = 5.0  # CPU seconds per input; a healthy parse of these inputs takes milliseconds


class FuzzTimeout(BaseException):
    """An input ran past the time limit (a BaseException: no ``except Exception`` eats it)."""


@contextmanager
def time_limit(seconds: float = TIME_LIMIT_S):
    """Interrupt Python code that uses more than ``seconds`` of CPU, and fail code that
    returns having used more.

    CPU time, not wall time: a test run niced on a busy machine must not fail for
    waiting its turn.  The virtual timer (SIGVTALRM) stops a loop in Python; a single C
    call (one huge multiplication) cannot be interrupted, so the CPU time is checked
    again when it returns.
    """

    def on_alarm(signum, frame):
        raise FuzzTimeout(f"used more than {seconds} s of CPU")

    old = signal.signal(signal.SIGVTALRM, on_alarm)
    signal.setitimer(signal.ITIMER_VIRTUAL, seconds)
    start = time.process_time()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, old)
    used = time.process_time() - start
    if used > seconds:
        raise FuzzTimeout(f"used {used:.1f} s of CPU (limit {seconds} s)")


# ----------------------------------------------------------------------------- seeds


@functools.cache
def safetensors_seeds() -> tuple[bytes, ...]:
    """Small valid files: several dtypes, an empty tensor, a scalar, metadata, a layer layout."""
    g = torch.Generator().manual_seed(0)
    mixed = {
        "a": torch.randn(2, 3, generator=g),
        "b": torch.arange(4, dtype=torch.int64),
        "c": torch.zeros(0, 5, dtype=torch.bfloat16),
        "d": torch.tensor(7, dtype=torch.uint8),
        "e": torch.tensor([True, False, True]),
    }
    layers = {
        f"model.layers.{i}.{n}": torch.randn(4, 4, generator=g).to(torch.float16)
        for i in range(2)
        for n in ("self_attn.q_proj.weight", "mlp.up_proj.weight")
    }
    layers["model.embed_tokens.weight"] = torch.randn(8, 4, generator=g).to(torch.float16)
    layers["model.norm.weight"] = torch.ones(4, dtype=torch.float16)
    return (
        save(mixed, metadata={"format": "pt", "note": "seed"}),
        save(layers),
        save({"only": torch.randn(3, generator=g).to(torch.float64)}),
    )


@functools.cache
def recipe_seeds() -> tuple[tuple[str, str], ...]:
    """Valid recipes as (text, suffix): every entry kind, YAML and JSON."""
    full = {
        "models": {"base": "org/base", "chat": "./chat", "math": "builtin:smollm2-135m-instruct"},
        "base": "base",
        "dtype": "bfloat16",
        "layers": [
            {"from": "base", "layers": [0, 3]},
            {"from": "chat", "layer": 3},
            {
                "merge": "linear",
                "sources": [
                    {"from": "chat", "layer": 4, "weight": 0.6},
                    {"from": "math", "layer": 4},
                ],
            },
            {
                "merge": "task_arithmetic",
                "base": {"from": "base", "layer": 5},
                "sources": [{"from": "chat", "layer": 5}, {"from": "math", "layer": 5}],
                "lambda": 0.7,
            },
            {
                "merge": "ties",
                "base": {"from": "base", "layer": 6},
                "sources": [{"from": "chat", "layer": 6}],
                "density": 0.5,
            },
            {
                "merge": "slerp",
                "sources": [{"from": "chat", "layer": 7}, {"from": "math", "layer": 7}],
                "t": 0.3,
            },
            {
                "merge": "laco",
                "sources": [{"from": "base", "layer": 8}, {"from": "base", "layer": 9}],
            },
        ],
        "embeddings": "base",
        "head": "chat",
    }
    small = {"models": {"m": "/models/m"}, "layers": [{"from": "m", "layers": [0, 2]}]}
    recipe = Recipe.from_dict(full)
    flow = (
        "models: {a: org/a, b: org/b}\n"
        "layers:\n"
        "  - {from: a, layers: [0, 4]}\n"
        "  - merge: passthrough\n"
        "    sources: [{from: b, layer: 4}]\n"
    )
    return (
        (recipe.to_yaml(), ".yaml"),
        (recipe.to_json(), ".json"),
        (yaml.safe_dump(small), ".yaml"),
        (json.dumps(small), ".json"),
        (flow, ".yaml"),
    )


# ----------------------------------------------------------------------------- values

_INTS = [0, 1, 2, 3, 7, 8, 255, 256, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**60, 2**63 - 1]
_INTS += [2**63, 2**64 - 1, 2**64, 10**30, -1, -2, -(2**31), -(2**63), -(2**64)]


def interesting_int(rng: random.Random, near: int | None = None) -> int:
    r = rng.random()
    if near is not None and r < 0.3:
        return near + rng.randint(-3, 3)
    if r < 0.7:
        return rng.choice(_INTS)
    if r < 0.95:
        return rng.randint(-1000, 1000)
    return int("9" * rng.randint(20, 4200))  # below Python's 4,300-digit limit


def random_json(rng: random.Random, depth: int = 0) -> object:
    """Any JSON value, shallow, biased to values parsers trip on."""
    kinds = ["int", "float", "str", "bool", "null", "list", "dict"]
    kind = rng.choice(kinds if depth < 3 else kinds[:5])
    if kind == "int":
        return interesting_int(rng)
    if kind == "float":
        return rng.choice([0.5, -0.0, 1e308, -1e308, 1e-320, float("nan"), float("inf"), 3.0])
    if kind == "str":
        return rng.choice(["", "F32", "f32", "U8 ", "../../etc/passwd", "\u00e9\u4e2d", "x" * 300])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["a", "dtype", "shape", ""]): random_json(rng, depth + 1) for _ in range(2)}


def huge_nesting(rng: random.Random) -> str:
    n = rng.choice([50, 500, 5000, 50_000])
    return "[" * n + "]" * n if rng.random() < 0.5 else '{"a":' * n + "1" + "}" * n


# ----------------------------------------------------------------------------- safetensors


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _assemble(header_text: bytes, body: bytes, length: int | None = None) -> bytes:
    n = len(header_text) if length is None else length
    return struct.pack("<Q", n % 2**64) + header_text + body


def _mutate_header_doc(doc: dict, body: bytes, rng: random.Random) -> object:
    names = [k for k in doc if k != "__metadata__"]
    name = rng.choice(names) if names else "x"
    entry = doc.get(name)
    op = rng.randrange(14)
    if op == 0 and isinstance(entry, dict):  # offsets: negative, huge, past the end, overlapping
        other = doc.get(rng.choice(names)) if names else None
        if isinstance(other, dict) and "data_offsets" in other and rng.random() < 0.3:
            entry["data_offsets"] = copy.deepcopy(other["data_offsets"])
        else:
            entry["data_offsets"] = [
                interesting_int(rng, near=len(body)),
                interesting_int(rng, near=len(body)),
            ]
    elif op == 1 and isinstance(entry, dict):  # shapes whose product overflows, or negative
        entry["shape"] = [interesting_int(rng) for _ in range(rng.randint(0, 6))]
    elif op == 2 and isinstance(entry, dict):  # a very long shape
        entry["shape"] = [rng.choice([1, 2, 3])] * rng.choice([64, 1000, 20_000])
    elif op == 3 and isinstance(entry, dict):
        entry["dtype"] = rng.choice(
            [*DTYPES, "F8_E4M3", "f32", "", "I128", 4, None, ["F32"], {"F32": 1}]
        )
    elif op == 4 and isinstance(entry, dict):  # a field missing, added or of the wrong type
        key = rng.choice(["dtype", "shape", "data_offsets", "extra"])
        if key in entry and rng.random() < 0.5:
            del entry[key]
        else:
            entry[key] = random_json(rng)
    elif op == 5:
        doc[name] = random_json(rng)
    elif op == 6:  # a new tensor copying an existing span: overlap
        if isinstance(entry, dict):
            doc[rng.choice(["z", "", "__metadata__ ", "é" * 50])] = copy.deepcopy(entry)
    elif op == 7:
        doc["__metadata__"] = rng.choice(
            [None, [], "x", {"a": 1}, {"a": None}, {"format": "pt"}, random_json(rng)]
        )
    elif op == 8:  # not an object at all
        return random_json(rng)
    elif op == 9 and isinstance(entry, dict):  # shape and span agree, but the span is huge
        count = rng.choice([2**40, 2**62, 2**70])
        entry["shape"] = [count]
        entry["data_offsets"] = [0, count * 4]
        entry["dtype"] = "F32"
    elif op == 10 and isinstance(entry, dict):
        entry["data_offsets"] = rng.choice(
            [[0], [0, 1, 2], [0.0, 4.0], ["0", "4"], [True, 4], None]
        )
    elif op == 11 and isinstance(entry, dict):
        entry["shape"] = rng.choice([[2.0], ["2"], [True], [[2]], None, 2, [-0]])
    elif op == 12 and names:
        del doc[name]
    elif op == 13 and isinstance(entry, dict):  # an empty tensor at the very end
        entry["shape"] = [0]
        entry["data_offsets"] = [len(body), len(body)]
    return doc


def mutate_safetensors(seed: bytes, rng: random.Random) -> bytes:
    """A mutant of a valid safetensors file: structural header edits and/or byte damage."""
    doc, body = _split(seed)
    length: int | None = None
    text: bytes
    mode = rng.randrange(10)
    if mode < 5:  # edit the JSON, re-encode it
        value: object = doc
        for _ in range(rng.randint(1, 3)):
            value = _mutate_header_doc(value, body, rng) if isinstance(value, dict) else value
        text = json.dumps(value).encode()
    else:
        text = json.dumps(doc).encode()
    if mode == 5:  # a duplicated key, text level (json.dumps cannot write one)
        names = [k for k in doc if k != "__metadata__"]
        name = rng.choice(names)
        text = (
            b"{"
            + json.dumps(name).encode()
            + b":"
            + json.dumps(doc[name]).encode()
            + b","
            + text[1:]
        )
    elif mode == 6:  # a number with thousands of digits, or deep nesting
        junk = "1" * rng.choice([400, 4400, 9000]) if rng.random() < 0.5 else huge_nesting(rng)
        text = text.replace(b'"data_offsets": [0', b'"data_offsets": [' + junk.encode(), 1)
    elif mode == 7:  # the length field lies
        length = rng.choice(
            [
                0,
                1,
                7,
                len(text) - 1,
                len(text) + 1,
                len(text) + len(body) + 1,
                2**32,
                2**60,
                2**63,
                2**64 - 1,
            ]
        )
    if rng.random() < 0.2:  # the data area grows or shrinks
        body = body[: rng.randrange(len(body) + 1)] if rng.random() < 0.5 else body + bytes(16)
    out = bytearray(_assemble(text, body, length))
    if mode == 8 or rng.random() < 0.15:  # byte flips anywhere, the length field included
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8) if rng.random() < 0.7 else rng.randrange(256)
    if mode == 9 or rng.random() < 0.1:  # truncation
        del out[rng.randrange(len(out) + 1) :]
    return bytes(out)


class _ReadChecked:
    """A binary file that refuses any read past the end of the file or without a size."""

    def __init__(self, f, size: int, log: list[tuple[int, int]]):
        self._f, self._size, self._log = f, size, log

    def read(self, n: int = -1) -> bytes:
        pos = self._f.tell()
        if n is None or n < 0:
            raise AssertionError(f"unbounded read at byte {pos} of a {self._size}-byte file")
        if pos + n > self._size:
            raise AssertionError(
                f"read of {n} bytes at byte {pos} passes the end of the {self._size}-byte file"
            )
        self._log.append((pos, n))
        return self._f.read(n)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@contextmanager
def checked_reads(log: list[tuple[int, int]]):
    """Route the header parser's ``open`` through ``_ReadChecked``."""
    import builtins
    import os

    def opener(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        return _ReadChecked(f, os.fstat(f.fileno()).st_size, log) if "b" in mode else f

    safetensors_format.open = opener  # module global shadows the builtin for read_header
    try:
        yield
    finally:
        del safetensors_format.open


def check_header_invariants(header: Header, size: int) -> None:
    """What an accepted header promises: every span inside the data area, sized, disjoint."""
    assert 8 <= header.data_start <= size == header.file_size
    spans = []
    for t in header.tensors.values():
        assert header.data_start <= t.start <= t.end <= size, t
        assert math.prod(t.shape) * itemsize(t.dtype) == t.end - t.start, t
        spans.append((t.start, t.end))
    spans = sorted(s for s in spans if s[1] > s[0])
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "overlapping spans accepted"
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in header.metadata.items())


def check_safetensors(data: bytes, path: Path) -> str:
    """The header-parser property on one input; returns "loaded" or "rejected"."""
    path.write_bytes(data)
    reads: list[tuple[int, int]] = []
    with time_limit(), checked_reads(reads):
        try:
            header = read_header(path)
        except TailorkitError:
            header = None
    # It reads the length field and the header, nothing else; never more than the file holds.
    assert sum(n for _, n in reads) <= len(data)
    if header is None:
        return "rejected"
    check_header_invariants(header, len(data))
    return "loaded"


# ----------------------------------------------------------------------------- recipes

_YAML_TOKENS = [
    "!!python/object/apply:os.system ['echo pwned']",
    "!!python/name:os.system",
    "&a [*a]",
    "*nowhere",
    "<<: *a",
    "!!binary 'AAA'",
    "!!binary '%%%'",
    "!!int abc",
    "!!float x",
    "!!timestamp 2001-13-45",
    "2001-13-45",
    "? [a]: b",
    "{",
    "[",
    "]",
    '"',
    "'",
    "\t",
    "%YAML 1.1\n---\n",
    "---",
    "...",
    "~",
    ".nan",
    ".inf",
    "-.inf",
    "0x1F",
    "0o17",
    "1e400",
    "1_000",
    "null",
    "yes",
    "on",
    "!!set {a, b}",
    "!!omap [a: 1]",
    "\x00",
    "\ufeff",
    "\ud7ff",
    "../../../../tmp/x",
    "/etc/passwd",
    "from",
    "layers",
    "merge",
    "weight",
]


def mutate_recipe(seed: tuple[str, str], rng: random.Random) -> tuple[bytes, str]:
    """A mutant recipe file: structural edits of a valid one, or text damage."""
    text, suffix = seed
    mode = rng.randrange(6)
    if mode < 2:  # structural: change a value somewhere, re-serialise
        doc = _parse(text, suffix)
        _mutate_tree(doc, rng)
        text = _dump(doc, suffix, rng)
    elif mode == 2:  # insert YAML / JSON syntax at a random place
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(text) + 1)
            text = text[:i] + rng.choice(_YAML_TOKENS) + text[i:]
    elif mode == 3:  # lines dropped, doubled or swapped
        lines = text.splitlines(keepends=True)
        for _ in range(rng.randint(1, 3)):
            i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
            op = rng.randrange(3)
            if op == 0 and len(lines) > 1:
                del lines[i]
            elif op == 1:
                lines.insert(i, lines[j])
            else:
                lines[i], lines[j] = lines[j], lines[i]
        text = "".join(lines)
    elif mode == 4:  # pathological documents
        text = rng.choice(
            [
                huge_nesting(rng),
                "a: " + "9" * rng.choice([100, 4400, 9000]),
                "&x [" + ", ".join(["*x"] * 3) + "]",
                "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nlayers: [*c, *c, *c, *c, *c, *c]\n",
                "",
                "- 1\n- 2\n",
                "42",
                "null",
                '"models"',
            ]
        )
    data = bytearray(text.encode("utf-8", "surrogatepass"))
    if mode == 5 or rng.random() < 0.1:  # byte flips (invalid UTF-8 included) and truncation
        for _ in range(rng.randint(1, 6)):
            if data:
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        if rng.random() < 0.5:
            del data[rng.randrange(len(data) + 1) :]
    return bytes(data), suffix if rng.random() < 0.9 else rng.choice([".yaml", ".json", ".yml"])


def _parse(text: str, suffix: str) -> object:
    return json.loads(text) if suffix == ".json" else yaml.safe_load(text)


def _dump(doc: object, suffix: str, rng: random.Random) -> str:
    if suffix == ".json":
        return json.dumps(doc, indent=rng.choice([None, 2]))
    return yaml.safe_dump(doc, default_flow_style=rng.choice([None, True, False]))


_RECIPE_VALUES = [
    -1,
    0,
    1,
    2**31,
    2**63,
    10**30,
    0.5,
    -0.0,
    1e308,
    float("nan"),
    float("inf"),
    True,
    None,
    "",
    "base",
    "chat",
    "nope",
    "../../x",
    "/abs/path",
    "linear",
    "slerp",
    "ties",
    "float64",
    [],
    [0],
    [3, 1],
    [0, 10**12],
    [-1, 2],
    {},
    {"from": "base"},
    {"from": "base", "layer": 0},
    {"merge": "linear"},
]


def _mutate_tree(doc: object, rng: random.Random) -> None:
    """Replace, delete or add one value at a random place in the parsed document."""
    for _ in range(rng.randint(1, 3)):
        node = doc
        for _ in range(rng.randint(0, 5)):
            children = (
                list(node.values())
                if isinstance(node, dict)
                else node
                if isinstance(node, list)
                else []
            )
            children = [c for c in children if isinstance(c, (dict, list))]
            if not children:
                break
            node = rng.choice(children)
        value = (
            copy.deepcopy(rng.choice(_RECIPE_VALUES)) if rng.random() < 0.8 else random_json(rng)
        )
        if isinstance(node, dict):
            keys = list(node) + ["extra", "lambda", "density", "t", "weight", "base", "head"]
            key = rng.choice(keys)
            if key in node and rng.random() < 0.25:
                del node[key]
            else:
                node[key] = value
        elif isinstance(node, list):
            if node and rng.random() < 0.3:
                del node[rng.randrange(len(node))]
            elif node and rng.random() < 0.5:
                node[rng.randrange(len(node))] = value
            else:
                node.append(value)


def check_recipe(data: bytes, suffix: str, path: Path) -> str:
    """The recipe-loader property on one input; returns "loaded" or "rejected".

    An accepted recipe must also survive its own round trip: what ``to_yaml`` and
    ``to_json`` write loads back equal.
    """
    path = path.with_suffix(suffix)
    path.write_bytes(data)
    with time_limit():
        try:
            recipe = Recipe.load(path)
        except TailorkitError:
            return "rejected"
        for text, ext in ((recipe.to_yaml(), ".yaml"), (recipe.to_json(), ".json")):
            again = path.with_name("roundtrip" + ext)
            again.write_text(text)
            assert Recipe.load(again) == recipe, f"{ext} round trip changed the recipe"
        recipe.fingerprint()
    return "loaded"


def check_recipe_dict(doc: object) -> str:
    """``Recipe.from_dict`` on any Python value: a Recipe or a RecipeError."""
    with time_limit():
        try:
            Recipe.from_dict(doc)
        except TailorkitError:
            return "rejected"
    return "loaded"
