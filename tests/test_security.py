"""Security: no code from strangers runs, nothing is written outside the output folder,
a hostile header cannot make tailorkit allocate, and the Hub token never leaks.

- Static checks of the source tree (AST, so aliases and keyword arguments count): no
  ``pickle`` import or other unpickler, no ``torch.load`` without ``weights_only=True``,
  no ``numpy.load(allow_pickle=True)``, no unsafe YAML loader, no ``eval``/``exec``,
  ``trust_remote_code`` never set to anything but False unless passed through from the
  caller, and every transformers model load restricted to safetensors.
- Behaviour: pickle checkpoints (a ``.bin`` that would run code when unpickled) are
  refused everywhere a model is opened; a config that needs remote code is refused.
- Path traversal: odd model names and references, Hub ids with ``..``, extra file
  names with folders or absolute paths, shard names in an index: the build writes
  only inside its output folder (and its own temporary sibling).
- Malicious headers and configs are refused before anything is allocated from the
  numbers they claim (measured with tracemalloc).
- The token is absent from exceptions (chained ones included), log records at DEBUG,
  the CLI's output and every file under the test's folders, for a Hub that cannot be
  reached and one that echoes the Authorization header back in its errors.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import logging
import os
import pickle
import shutil
import socket
import struct
import threading
import time
import tracemalloc
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import tailorkit
import tailorkit as tk
from tailorkit.checkpoint.safetensors_format import read_header
from tailorkit.checkpoint.source import HUB_PATTERNS, Source, resolve
from tailorkit.cli import main as cli
from tailorkit.errors import CheckpointError, RecipeError, TailorkitError

PACKAGE = Path(tailorkit.__file__).parent

# ----------------------------------------------------------------------------- static checks

# Calls that unpickle (or otherwise run what a file says), by qualified name.
UNSAFE_CALLS = {
    "pickle.load",
    "pickle.loads",
    "pickle.Unpickler",
    "_pickle.load",
    "_pickle.loads",
    "cPickle.load",
    "dill.load",
    "dill.loads",
    "cloudpickle.load",
    "cloudpickle.loads",
    "joblib.load",
    "marshal.load",
    "marshal.loads",
    "shelve.open",
    "yaml.load",
    "yaml.load_all",
    "yaml.unsafe_load",
    "yaml.unsafe_load_all",
    "yaml.full_load",
    "yaml.full_load_all",
    "torch.serialization.load",
    "pandas.read_pickle",
    "eval",
    "exec",
}
UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "shelve", "marshal"}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> qualified name, from every import in the file."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = (
                    a.name if a.asname else a.name.split(".")[0]
                )
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _qualified(func: ast.expr, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    parts.append(aliases.get(func.id, func.id))
    return ".".join(reversed(parts))


def _is_const(node: ast.expr | None, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def audit(source: str, filename: str = "<source>") -> list[str]:
    """Every unsafe load in ``source``, as 'file:line: what'."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found = []

    def report(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in UNSAFE_MODULES:
                    report(node, f"imports {a.name}")
        elif (
            isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES
        ):
            report(node, f"imports from {node.module}")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = args.posonlyargs + args.args
            defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
            for arg, default in [
                *zip(positional, defaults),
                *zip(args.kwonlyargs, args.kw_defaults),
            ]:
                if arg.arg == "trust_remote_code" and not _is_const(default, False):
                    report(node, f"{node.name}(trust_remote_code=...) does not default to False")
        elif isinstance(node, ast.Call):
            name = _qualified(node.func, aliases) or ""
            kwargs = {k.arg: k.value for k in node.keywords if k.arg}
            if name in UNSAFE_CALLS:
                report(node, f"calls {name}")
            if name == "torch.load" and not _is_const(kwargs.get("weights_only"), True):
                report(node, "torch.load without weights_only=True")
            if name in ("numpy.load", "np.load") and not _is_const(
                kwargs.get("allow_pickle", ast.Constant(False)), False
            ):
                report(node, "numpy.load with allow_pickle")
            remote = kwargs.get("trust_remote_code")
            if remote is not None and not (
                _is_const(remote, False)
                or (isinstance(remote, ast.Name) and remote.id == "trust_remote_code")
            ):
                report(
                    node,
                    "trust_remote_code set to something other than False or the caller's choice",
                )
            head = name.rsplit(".", 1)
            if (
                len(head) == 2
                and head[1] == "from_pretrained"
                and "Model" in head[0].rsplit(".", 1)[-1]
            ):
                if not (_is_const(kwargs.get("use_safetensors"), True) or "gguf_file" in kwargs):
                    report(node, f"{name} may unpickle a .bin: pass use_safetensors=True")
    return found


def test_the_audit_finds_what_it_looks_for():
    bad = """
import pickle
import torch as T
from yaml import load
from torch import load as tload
from transformers import AutoModelForCausalLM as M
T.load(f)
T.load(f, weights_only=False)
tload(f)
load(text)
eval("1")
M.from_pretrained(path)
def f(trust_remote_code=True): pass
g(trust_remote_code=True)
np.load(f, allow_pickle=True)
"""
    found = audit(bad)
    for what in [
        ":2: imports pickle",
        ":7: torch.load without",
        ":8: torch.load without",
        ":9: torch.load without",
        ":10: calls yaml.load",
        ":11: calls eval",
        ":12: transformers.AutoModelForCausalLM.from_pretrained may unpickle",
        ":13: f(trust_remote_code=...)",
        ":14: trust_remote_code set",
        ":15: numpy.load with allow_pickle",
    ]:
        assert any(what in line for line in found), (what, found)
    good = """
import torch, yaml
torch.load(f, weights_only=True)
yaml.safe_load(text)
AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
AutoTokenizer.from_pretrained(path)
def f(trust_remote_code=False):
    g(trust_remote_code=trust_remote_code)
"""
    assert audit(good) == []


def test_no_unpickling_no_remote_code_anywhere_in_tailorkit():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    found = [
        line for f in files for line in audit(f.read_text(), str(f.relative_to(PACKAGE.parent)))
    ]
    assert found == []


def test_hub_downloads_fetch_no_pickles_and_no_code():
    fetched = [
        "model.safetensors",
        "model-00001-of-00002.safetensors",
        "config.json",
        "tokenizer.json",
    ]
    refused = [
        "pytorch_model.bin",
        "model.pt",
        "model.ckpt",
        "weights.pkl",
        "modeling_evil.py",
        "setup.sh",
    ]
    matches = lambda name: any(fnmatch.fnmatch(name, p) for p in HUB_PATTERNS)  # noqa: E731
    assert all(map(matches, fetched))
    assert not any(map(matches, refused))


# ----------------------------------------------------------------------------- pickles, remote code


class _Payload:
    """Unpickling this creates ``path``: proof that a pickle was loaded."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.fixture
def pickle_model(family, tmp_path) -> tuple[Path, Path]:
    """A model folder whose weights are only a pickle that runs code when loaded."""
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copyfile(family.base / "config.json", folder / "config.json")
    marker = tmp_path / "pickle-was-loaded"
    payload = pickle.dumps({"model.embed_tokens.weight": _Payload(marker)})
    for name in ("pytorch_model.bin", "model.pt"):
        (folder / name).write_bytes(payload)
    return folder, marker


def test_pickle_checkpoints_are_refused_everywhere(pickle_model, tmp_path, capsys):
    from tailorkit.eval.run import load_model

    folder, marker = pickle_model
    with pytest.raises(CheckpointError, match=r"holds only pickle checkpoints"):
        Source(str(folder))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump({"models": {"m": str(folder)}, "layers": [{"from": "m", "layer": 0}]})
    )
    assert cli(["build", str(recipe), str(tmp_path / "out"), "-q"]) == 2
    assert "pickle" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(str(folder))
    assert cli(["generate", str(folder)]) == 2  # generate loads through load_model
    assert "pickle" in capsys.readouterr().err
    # A pickle under a safetensors name is not parsed as one either.
    disguised = tmp_path / "disguised"
    shutil.copytree(folder, disguised)
    (disguised / "pytorch_model.bin").rename(disguised / "model.safetensors")
    with pytest.raises(CheckpointError):
        Source(str(disguised))
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_a_model_that_needs_remote_code_is_refused(family, tmp_path):
    from tailorkit.assembly import config_from_dict

    config = json.loads((family.base / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    with pytest.raises(CheckpointError, match="remote code.*trust_remote_code=True"):
        config_from_dict(config)
    assert config_from_dict(config, trust_remote_code=True).model_type == config["model_type"]

    evil = shutil.copytree(family.base, tmp_path / "evil")
    (evil / "config.json").write_text(json.dumps(config))
    (evil / "modeling_evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w')\n")
    recipe = tk.Recipe.from_dict(
        {"models": {"m": str(evil)}, "layers": [{"from": "m", "layers": [0, 2]}]}
    )
    with pytest.raises(CheckpointError, match="remote code"):
        tk.assemble(recipe)
    built = tk.build(recipe, tmp_path / "out", progress=False)
    assert not (built / "modeling_evil.py").exists()  # a build never copies code
    assert not (tmp_path / "ran").exists()


# ----------------------------------------------------------------------------- path traversal


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_odd_model_names_and_references_write_only_inside_out(family, tmp_path, monkeypatch):
    sandbox = tmp_path / "sandbox"
    work = sandbox / "a" / "b" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    base_rel = os.path.relpath(family.base, work)  # ../../../..../llama-...: a legitimate read
    ft = shutil.copytree(family.candidates[0], sandbox / "ft")
    recipe = {
        "models": {
            "../../escaped": base_rel,
            "/etc/passwd": f"{work}/../../../ft",
            "a/b\\c": str(ft) + "/",
        },
        "layers": [
            {"from": "../../escaped", "layers": [0, 2]},
            {
                "merge": "linear",
                "sources": [{"from": "/etc/passwd", "layer": 2}, {"from": "a/b\\c", "layer": 2}],
            },
        ],
        "head": "/etc/passwd",
    }
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    before = _tree(sandbox)
    assert cli(["build", "recipe.yaml", "../out", "-q"]) == 0
    created = _tree(sandbox) - before
    assert created and all(p == "a/b/out" or p.startswith("a/b/out/") for p in created), created
    assert sorted(p.name for p in (sandbox / "a" / "b").iterdir()) == ["out", "work"]


@pytest.mark.parametrize(
    "ref",
    [
        "org/../../etc",
        "../org/name",
        "org/..",
        "org/name/../../x",
        "..%2F/x",
        "/org/name",
        "org/na me",
    ],
)
def test_hub_ids_with_dots_or_slashes_are_refused_before_any_download(ref, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: calls.append(a))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError):
        resolve(ref)
    assert calls == []


@pytest.mark.parametrize(
    "name", ["../escape.txt", "/tmp/abs.txt", "a/b.txt", "", ".", "..", "x\0y"]
)
def test_extra_file_names_cannot_leave_the_output_folder(family, tmp_path, name):
    recipe = tk.Recipe.from_dict(
        {"models": {"m": str(family.base)}, "layers": [{"from": "m", "layer": 0}]}
    )
    src = tmp_path / "figure.png"
    src.write_bytes(b"\x89PNG")
    for extra in ({"extra_files": {name: src}}, {"extra_texts": {name: "x"}}):
        with pytest.raises(TailorkitError, match="plain file name"):
            tk.build(recipe, tmp_path / "out", progress=False, **extra)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["figure.png"]


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/hostname", "sub/x.safetensors"])
def test_index_shard_names_cannot_point_outside_the_model(family, tmp_path, shard):
    model = shutil.copytree(family.base, tmp_path / "m")
    index = {"weight_map": {"model.embed_tokens.weight": shard}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="plain file name"):
        Source(str(model))


# ----------------------------------------------------------------------------- hostile numbers


def _peak(fn) -> int:
    """Peak traced Python memory of ``fn()``, which must raise a TailorkitError."""
    tracemalloc.start()
    try:
        with pytest.raises(TailorkitError):
            fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _header_file(
    path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None
) -> Path:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


_ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
HOSTILE_HEADERS = {
    "length 2^60": ({}, b"", 2**60),
    "length 2^64-1": ({}, b"", 2**64 - 1),
    "length one past the file": ({"a": _ENTRY}, bytes(8), "past"),
    "shape product past int64": ({"a": {**_ENTRY, "shape": [2**40, 2**40, 2**40]}}, bytes(8), None),
    "shape product of 100,000 dims": ({"a": {**_ENTRY, "shape": [2] * 100_000}}, bytes(8), None),
    "huge span": ({"a": {**_ENTRY, "shape": [2**62], "data_offsets": [0, 2**64]}}, bytes(8), None),
    "negative offset": ({"a": {**_ENTRY, "data_offsets": [-8, 0]}}, bytes(8), None),
    "negative dimension": ({"a": {**_ENTRY, "shape": [-2, -1]}}, bytes(8), None),
    "overlap": ({"a": _ENTRY, "b": {**_ENTRY, "data_offsets": [4, 12]}}, bytes(12), None),
    "offsets past the data": (
        {"a": {**_ENTRY, "data_offsets": [2**40, 2**40 + 8]}},
        bytes(8),
        None,
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE_HEADERS))
def test_hostile_header_is_refused_before_any_allocation(tmp_path, case):
    header, data, length = HOSTILE_HEADERS[case]
    if length == "past":
        length = len(json.dumps(header)) + len(data) + 1
    path = _header_file(tmp_path / "x.safetensors", header, data, length)
    start = time.process_time()
    peak = _peak(lambda: read_header(path))
    assert time.process_time() - start < 2.0
    # The header parse itself (a 300 KB JSON at most here) and nothing from the claimed sizes.
    assert peak < 8 * path.stat().st_size + (1 << 20), f"{peak:,} bytes traced"


def test_an_accepted_header_costs_its_size_not_the_data(tmp_path):
    path = tmp_path / "big.safetensors"
    save_file({"w": torch.zeros(4096, 4096)}, path)  # 64 MB of data
    tracemalloc.start()
    try:
        header = read_header(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert header.tensors["w"].nbytes == 64 << 20 and peak < 1 << 20


def test_hostile_config_and_layer_names_are_refused_fast(family, tmp_path):
    model = shutil.copytree(family.base, tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**15}))
    assert _peak(lambda: Source(str(model))) < 1 << 22  # not set(range(10**15))

    (model / "config.json").write_text(json.dumps(config))
    name = "model.layers." + "9" * 5000 + ".mlp.weight"  # int() of it would raise ValueError
    save_file({name: torch.zeros(1)}, model / "model.safetensors")
    with pytest.raises(CheckpointError, match="absurd layer index"):
        Source(str(model))


def test_a_recipe_range_past_the_model_is_refused_before_it_is_expanded(family):
    recipe = tk.Recipe.from_dict(
        {"models": {"m": str(family.base)}, "layers": [{"from": "m", "layers": [0, 10**12]}]}
    )
    start = time.process_time()
    with pytest.raises(
        RecipeError,
        match=r"layers\[0\]: range \[0, 1000000000000\) of model 'm' goes past its 4 layers",
    ):
        recipe.plan()
    assert time.process_time() - start < 2.0


# ----------------------------------------------------------------------------- the token

TOKEN = "hf_securityTestSecret_9f8e7d6c5b4a3210"


class EchoHub:
    """A Hub that answers every request with ``status`` and the Authorization header it got."""

    def __init__(self, status: int):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _any(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.dumps(
                    {
                        "error": f"refused; you sent {self.headers.get('Authorization')} to {self.path}"
                    }
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _closed_port_endpoint() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def built(tmp_path_factory, family) -> Path:
    recipe = tk.Recipe.from_dict(
        {"models": {"m": str(family.base)}, "layers": [{"from": "m", "layers": [0, 2]}]}
    )
    return tk.build(recipe, tmp_path_factory.mktemp("built") / "tiny", progress=False)


def _chain(e: BaseException | None):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


@pytest.mark.parametrize("hub", ["unreachable", "403", "400", "500"])
def test_the_token_never_leaks(built, tmp_path, monkeypatch, caplog, capsys, hub):
    from huggingface_hub import constants

    from tailorkit.hub import HubError, push_folder

    echo = None if hub == "unreachable" else EchoHub(int(hub))
    endpoint = _closed_port_endpoint() if echo is None else echo.endpoint
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    caplog.set_level(logging.DEBUG)
    try:
        with pytest.raises(HubError) as info:
            push_folder(built, "tk-org/tiny", token=TOKEN)
        assert "tk-org/tiny" in str(info.value)
        for e in _chain(info.value):
            assert TOKEN not in str(e) and TOKEN not in repr(e), type(e)

        monkeypatch.setenv("HF_TOKEN", TOKEN)  # the same through the CLI and the environment
        assert cli(["push", str(built), "tk-org/tiny"]) == 2
        out = capsys.readouterr()
        assert "tk-org/tiny" in out.err and TOKEN not in out.out + out.err
    finally:
        if echo is not None:
            echo.close()
    assert TOKEN not in caplog.text
    assert all(TOKEN not in str(r.args) for r in caplog.records)
    for root in (built, tmp_path):
        for p in root.rglob("*"):
            if p.is_file():
                assert TOKEN.encode() not in p.read_bytes(), p


@pytest.mark.parametrize("repo_id", ["tk-org/../x", "../tk-org", "tk-org/x/../../y", "/tk-org/x"])
def test_repo_ids_with_paths_are_refused_before_any_request(built, repo_id, monkeypatch):
    from huggingface_hub import constants

    from tailorkit.hub import HubError, push_folder

    monkeypatch.setattr(constants, "ENDPOINT", _closed_port_endpoint())
    with pytest.raises(HubError, match="invalid repo id") as info:
        push_folder(built, repo_id, token=TOKEN)
    assert TOKEN not in str(info.value)
