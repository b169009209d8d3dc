"""Fuzzing the two parsers that read what strangers write: the safetensors header and the recipe.

Property (tests/fuzzing.py): every input either loads or raises a ``TailorkitError``,
never another exception, within a time limit; the header parser never reads past the
end of the file; an accepted header's spans lie inside the data area, match their
shapes and do not overlap; an accepted recipe survives its own YAML and JSON round trip.

Inputs are mutants of valid seed files (hypothesis drives the mutators through
``st.randoms``), plus inputs hypothesis builds from scratch.  A few hundred per target
here (derandomized: the same inputs every run); the slow-marked test runs 2,000 per
target, and ``benchmarks/fuzz.py`` a fixed 20,000 per target, counting every failure.  The inputs
that found bugs are kept below as regression tests.
"""

from __future__ import annotations

import json
import random
import struct

import fuzzing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tailorkit.checkpoint.safetensors_format import read_header
from tailorkit.checkpoint.source import Source
from tailorkit.errors import CheckpointError, RecipeError
from tailorkit.recipe import Recipe

FAST = settings(
    max_examples=300,
    deadline=None,  # fuzzing.time_limit bounds each input instead, without flakiness
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


# ----------------------------------------------------------------------------- safetensors


@FAST
@given(seed=st.sampled_from(fuzzing.safetensors_seeds()), rng=st.randoms(use_true_random=False))
def test_header_parser_on_mutated_valid_files(scratch, seed, rng):
    fuzzing.check_safetensors(fuzzing.mutate_safetensors(seed, rng), scratch / "m.safetensors")


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=16,
)
_OFFSET = st.integers(0, 48) | st.integers(-(2**64), 2**64)
_ENTRY = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8", "f32"]) | _JSON,
        "shape": st.lists(st.integers(0, 6) | st.integers(-(2**70), 2**70), max_size=4) | _JSON,
        "data_offsets": st.lists(_OFFSET, min_size=2, max_size=2) | _JSON,
    }
)
_HEADER = st.dictionaries(
    st.sampled_from(["a", "b", "__metadata__"]) | st.text(max_size=10),
    _ENTRY | _ENTRY | _JSON,
    max_size=5,
)


@FAST
@given(header=_HEADER | _JSON, data_len=st.integers(0, 64), lie=st.none() | _OFFSET)
def test_header_parser_on_generated_headers(scratch, header, data_len, lie):
    text = json.dumps(header).encode()
    length = len(text) if lie is None else lie % 2**64
    data = struct.pack("<Q", length) + text + bytes(data_len)
    fuzzing.check_safetensors(data, scratch / "g.safetensors")


@FAST
@given(data=st.binary(max_size=300))
def test_header_parser_on_raw_bytes(scratch, data):
    fuzzing.check_safetensors(data, scratch / "r.safetensors")


def test_the_read_check_catches_a_read_past_the_end(tmp_path):
    """The harness's own check works: a parser that trusted the length field would fail it."""
    path = tmp_path / "x.bin"
    path.write_bytes(b"12345678")
    reads: list[tuple[int, int]] = []
    with fuzzing.checked_reads(reads):
        from tailorkit.checkpoint import safetensors_format

        with safetensors_format.open(path, "rb") as f:
            assert f.read(8) == b"12345678"
            with pytest.raises(AssertionError, match="passes the end"):
                f.read(2**60)
            with pytest.raises(AssertionError, match="unbounded"):
                f.read()
    assert reads == [(0, 8)]


# Inputs the fuzzer found that crashed or stalled the parser before it was fixed.
_HEADER_REGRESSIONS = {
    # an integer past Python's 4,300-digit limit: ValueError from json.loads
    "long integer": b'{"a":{"dtype":"F32","shape":[' + b"1" * 5000 + b'],"data_offsets":[0,4]}}',
    # 100,000 nested arrays: RecursionError from json.loads
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    # a shape of 300,000 twos: the product has 300,000 bits; quadratic to compute (seconds,
    # hours for longer lists) and then ValueError when the message tried to print it
    "long shape": json.dumps(
        {"a": {"dtype": "U8", "shape": [2] * 300_000, "data_offsets": [0, 1]}}
    ).encode(),
    # the same name twice: json keeps the last, the first span silently disappeared
    "duplicate name": b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
    b'"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}',
}


@pytest.mark.parametrize("name", list(_HEADER_REGRESSIONS))
def test_header_regressions(tmp_path, name):
    text = _HEADER_REGRESSIONS[name]
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(8))
    with fuzzing.time_limit(2.0), pytest.raises(CheckpointError) as e:
        read_header(path)
    assert len(str(e.value)) < 1000  # the message quotes the file, not megabytes of it


@pytest.mark.parametrize(
    ("file", "text"),
    [
        ("config.json", '{"num_hidden_layers": ' + "1" * 5000 + "}"),
        ("config.json", "[" * 100_000 + "]" * 100_000),
        ("config.json", b"\xff\xfe{}"),
        ("model.safetensors.index.json", '{"weight_map": {"a": ' + "1" * 5000 + "}}"),
    ],
)
def test_config_and_index_regressions(tmp_path, file, text):
    """Same bug class in the other JSON files a source reads: now a CheckpointError."""
    if file != "config.json":
        (tmp_path / "config.json").write_text('{"num_hidden_layers": 1}')
    target = tmp_path / file
    target.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(CheckpointError):
        Source(str(tmp_path))


# ----------------------------------------------------------------------------- recipes


@FAST
@given(seed=st.sampled_from(fuzzing.recipe_seeds()), rng=st.randoms(use_true_random=False))
def test_recipe_loader_on_mutated_valid_files(scratch, seed, rng):
    data, suffix = fuzzing.mutate_recipe(seed, rng)
    fuzzing.check_recipe(data, suffix, scratch / "recipe")


@FAST
@given(text=st.text(max_size=200), suffix=st.sampled_from([".yaml", ".json"]))
def test_recipe_loader_on_arbitrary_text(scratch, text, suffix):
    fuzzing.check_recipe(text.encode("utf-8", "surrogatepass"), suffix, scratch / "text")


_NAMES = st.sampled_from(["a", "b", "base", "", "../x"])
_REF = st.fixed_dictionaries(
    {"from": _NAMES, "layer": st.integers(-1, 40) | _JSON},
    optional={"weight": st.floats() | st.integers() | _JSON},
)
_RANGE = st.fixed_dictionaries(
    {"from": _NAMES, "layers": st.lists(st.integers(-1, 2**64), max_size=3)}
)
_MERGE = st.fixed_dictionaries(
    {
        "merge": st.sampled_from(
            ["passthrough", "linear", "task_arithmetic", "ties", "slerp", "laco", "x"]
        ),
        "sources": st.lists(_REF, max_size=3) | _JSON,
    },
    optional={
        "base": _REF | _JSON,
        "lambda": st.floats() | _JSON,
        "density": st.floats(),
        "t": st.floats(),
    },
)
_RECIPE = st.fixed_dictionaries(
    {
        "models": st.dictionaries(_NAMES, st.text(max_size=12) | _JSON, max_size=3),
        "layers": st.lists(_REF | _RANGE | _MERGE | _JSON, max_size=4),
    },
    optional={
        "base": _NAMES | _JSON,
        "dtype": st.sampled_from(["float32", "bfloat16", "int8"]) | _JSON,
        "embeddings": _NAMES,
        "head": _NAMES,
        "extra": _JSON,
    },
)


@FAST
@given(doc=_RECIPE | _JSON)
def test_recipe_from_dict_on_generated_values(doc):
    fuzzing.check_recipe_dict(doc)


_RECIPE_REGRESSIONS = {
    "not UTF-8": (b"\xff\xfemodels: {}", ".yaml"),
    "long integer (YAML)": (
        b"models: {a: b}\nlayers: [{from: a, layer: " + b"1" * 5000 + b"}]",
        ".yaml",
    ),
    "long integer (JSON)": (b'{"models": ' + b"1" * 5000 + b"}", ".json"),
    "impossible date": (b"models: 2001-13-45", ".yaml"),
    "bad explicit int": (b"models: !!int abc", ".yaml"),
    "bad explicit timestamp": (b"models: !!timestamp abc", ".yaml"),
    "deep nesting (YAML)": (b"[" * 100_000, ".yaml"),
    "deep nesting (JSON)": (b"[" * 100_000 + b"]" * 100_000, ".json"),
}


@pytest.mark.parametrize("name", list(_RECIPE_REGRESSIONS))
def test_recipe_regressions(tmp_path, name):
    data, suffix = _RECIPE_REGRESSIONS[name]
    path = tmp_path / f"r{suffix}"
    path.write_bytes(data)
    with fuzzing.time_limit(5.0), pytest.raises(RecipeError, match=r"r\.(yaml|json): not"):
        Recipe.load(path)


def test_unsafe_yaml_tags_are_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "r.yaml"
    path.write_text(f"models: !!python/object/apply:os.system ['touch {marker}']\nlayers: []\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        Recipe.load(path)
    assert not marker.exists()


# ----------------------------------------------------------------------------- long runs


@pytest.mark.slow
@pytest.mark.parametrize("target", ["safetensors", "recipe"])
def test_fuzz_2000_inputs(tmp_path, target):
    """The benchmark's loop (its first 2,000 inputs): every input loads or is refused."""
    failed = []
    for i in range(2000):
        rng = random.Random(i)
        if target == "safetensors":
            data = fuzzing.mutate_safetensors(rng.choice(fuzzing.safetensors_seeds()), rng)
            check = lambda: fuzzing.check_safetensors(data, tmp_path / "x.safetensors")  # noqa: E731
        else:
            data, suffix = fuzzing.mutate_recipe(rng.choice(fuzzing.recipe_seeds()), rng)
            check = lambda: fuzzing.check_recipe(data, suffix, tmp_path / "r")  # noqa: E731
        try:
            check()
        except (Exception, fuzzing.FuzzTimeout) as e:
            failed.append((i, f"{type(e).__name__}: {e}"[:200]))
    assert not failed, failed[:5]
