"""Model card and Hub upload, against a local HTTP server that plays the Hub.

The real huggingface_hub client talks to ``FakeHub`` (a threaded http.server on
127.0.0.1) through ``huggingface_hub.constants.ENDPOINT``.  The server answers what
``repo_exists``, ``create_repo``, ``create_branch``, ``delete_repo`` and one commit need —
repo lookup, creation and deletion, README metadata
validation, preupload (regular vs LFS), the LFS batch API with basic PUT upload and
verify, and the NDJSON commit — and keeps every file it receives.  Uploads take the
LFS path (``HF_HUB_DISABLE_XET``): the Xet protocol is a binary chunk store that a
test server cannot reasonably speak.  huggingface_hub picks Xet by itself when hf_xet is
installed; one test checks that this default path is taken and that its failure
leaves nothing behind.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard, constants

import tailorkit as tk
from tailorkit import cli
from tailorkit.card import make_model_card
from tailorkit.errors import CheckpointError, HubError
from tailorkit.hub import push_folder

TOKEN = "hf_tailorkitTestSecret0123456789abcdefXYZ"


class FakeHub:
    """Records repos, uploads and commits; ``files(repo)`` is the repo's content."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.lfs: dict[str, bytes] = {}
        self.commits: list[dict] = []
        self.branches: list[tuple[str, str]] = []
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep the test output clean
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self, status: int, payload=None, headers=()):
                data = json.dumps(payload if payload is not None else {}).encode()
                self.send_response(status)
                for name, value in dict(headers).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                self._handle("POST")

            def do_PUT(self):
                self._handle("PUT")

            def do_GET(self):
                self._handle("GET")

            def do_DELETE(self):
                self._handle("DELETE")

            def _handle(self, method: str):
                body = self._body()
                with hub.lock:
                    hub.requests.append(
                        {
                            "method": method,
                            "path": self.path,
                            "headers": {k.lower(): v for k, v in self.headers.items()},
                            "body": body,
                        }
                    )
                    status, payload, *headers = hub.route(method, self.path, body)
                self._reply(status, payload, *headers)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # -- the Hub API, as much of it as one push uses -----------------------------------
    def route(self, method: str, url: str, body: bytes):
        path, _, query = url.partition("?")
        if method == "POST" and path == "/api/repos/create":
            req = json.loads(body)
            repo = f"{req.get('organization') or 'tk-user'}/{req['name']}"
            if repo in self.repos:
                return 409, {
                    "error": "You already created this model repo",
                    "url": f"{self.endpoint}/{repo}",
                }
            self.repos[repo] = {"visibility": req.get("visibility"), "type": req.get("type")}
            return 200, {"url": f"{self.endpoint}/{repo}"}
        if method == "DELETE" and path == "/api/repos/delete":
            req = json.loads(body)
            self.repos.pop(f"{req.get('organization') or 'tk-user'}/{req['name']}", None)
            return 200, {}
        if method == "GET" and (m := re.fullmatch(r"/api/models/([^/]+/[^/]+)", path)):
            if m.group(1) not in self.repos:
                return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
            return 200, {"id": m.group(1), "sha": "0" * 40, "siblings": []}
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/branch/(.+)", path):
            ref = (m.group(1), m.group(2))
            if method == "DELETE":
                self.branches.remove(ref)
                return 200, {}
            if ref in self.branches:
                return 409, {"error": f"Reference already exists: refs/heads/{ref[1]}"}
            self.branches.append(ref)
            return 200, {}
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/(.+)", path):
            files = json.loads(body)["files"]
            modes = [
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                    "shouldIgnore": False,
                }
                for f in files
            ]
            return 200, {"files": modes}
        if m := re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path):
            objects = []
            for obj in json.loads(body)["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in self.lfs:  # no "actions": the object is already stored
                    entry["actions"] = {
                        "upload": {"href": f"{self.endpoint}/lfs-upload/{obj['oid']}"},
                        "verify": {"href": f"{self.endpoint}/lfs-verify"},
                    }
                objects.append(entry)
            return 200, {"transfer": "basic", "objects": objects}
        if method == "PUT" and (m := re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)):
            if hashlib.sha256(body).hexdigest() != m.group(1):
                return 400, {"error": "sha256 mismatch"}
            self.lfs[m.group(1)] = body
            return 200, {}
        if method == "POST" and path == "/lfs-verify":
            req = json.loads(body)
            ok = req["oid"] in self.lfs and len(self.lfs[req["oid"]]) == req["size"]
            return (200, {}) if ok else (404, {"error": "object not uploaded"})
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/(.+)", path):
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            files = {}
            for item in lines[1:]:
                value = item["value"]
                if item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "lfsFile":
                    if value["oid"] not in self.lfs:
                        return 422, {"error": f"LFS object of {value['path']} was never uploaded"}
                    files[value["path"]] = self.lfs[value["oid"]]
            oid = hashlib.sha1(body).hexdigest()
            self.commits.append(
                {
                    "repo": m.group(1),
                    "revision": m.group(2),
                    "create_pr": "create_pr=1" in query,
                    "summary": lines[0]["value"]["summary"],
                    "files": files,
                }
            )
            payload = {"commitUrl": f"{self.endpoint}/{m.group(1)}/commit/{oid}", "commitOid": oid}
            if "create_pr=1" in query:
                payload["pullRequestUrl"] = f"{self.endpoint}/{m.group(1)}/discussions/1"
            return 200, payload
        return 404, {"error": f"fake hub: no route for {method} {path}"}


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    hub = FakeHub()
    hub.thread.start()
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    yield hub
    hub.server.shutdown()
    hub.server.server_close()


def _recipe(base: Path, candidate: Path | None = None) -> tk.Recipe:
    models = {"base": str(base)}
    layers: list[dict] = [{"from": "base", "layers": [0, 2]}]
    if candidate is not None:
        models["ft"] = str(candidate)
        layers.append(
            {
                "merge": "task_arithmetic",
                "base": {"from": "base", "layer": 3},
                "sources": [{"from": "ft", "layer": 3}],
                "lambda": 0.5,
            }
        )
    return tk.Recipe.from_dict({"models": models, "layers": layers})


@pytest.fixture(scope="module")
def built(tmp_path_factory, family) -> Path:
    """A tiny built checkpoint (sharded, so several LFS files) with its model card."""
    out = tmp_path_factory.mktemp("built") / "tiny-3L"
    tk.build(_recipe(family.base, family.candidates[0]), out, shard_size="200KB", progress=False)
    return out


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- upload


def test_push_uploads_every_file_intact_in_one_commit(fake_hub, built, caplog):
    caplog.set_level(logging.DEBUG)
    (built / "figures").mkdir(exist_ok=True)
    (built / "figures" / "cka.png").write_bytes(b"\x89PNG fake image")
    try:
        url = push_folder(built, "tk-org/tiny-tailored", token=TOKEN, private=True)
    finally:
        shutil.rmtree(built / "figures")
    assert len(fake_hub.commits) == 1, "exactly one commit"
    commit = fake_hub.commits[0]
    assert commit["repo"] == "tk-org/tiny-tailored" and commit["revision"] == "main"
    assert url == f"{fake_hub.endpoint}/tk-org/tiny-tailored/commit/" + url.rsplit("/", 1)[1]
    assert fake_hub.repos["tk-org/tiny-tailored"]["visibility"] == "private"
    local = {
        p.relative_to(built).as_posix(): p.read_bytes() for p in built.rglob("*") if p.is_file()
    }
    local["figures/cka.png"] = b"\x89PNG fake image"
    assert sorted(commit["files"]) == sorted(local)
    for name, data in local.items():
        assert _sha(commit["files"][name]) == _sha(data), name
    shards = [n for n in local if n.endswith(".safetensors")]
    assert len(shards) > 1 and all(_sha(local[n]) in fake_hub.lfs for n in shards)
    # The token went where it belongs (the Authorization header) and nowhere else.
    assert any(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in fake_hub.requests)
    assert all(TOKEN.encode() not in data for data in commit["files"].values())
    assert all(TOKEN.encode() not in r["body"] for r in fake_hub.requests)
    assert all(TOKEN not in p.read_text(errors="ignore") for p in built.rglob("*") if p.is_file())
    assert TOKEN not in caplog.text and all(TOKEN not in str(r.args) for r in caplog.records)
    # ... including the HTTP transport's own DEBUG records (httpcore logs every request).
    assert any(r.name.startswith("httpcore") for r in caplog.records)


def test_push_refuses_a_symlink_out_of_the_folder(fake_hub, built, tmp_path):
    secret = tmp_path / "id_ed25519"
    secret.write_text("not for the Hub")
    (built / "notes.txt").symlink_to(secret)
    (built / "card.md").symlink_to(built / "README.md")  # inside the folder: uploaded as a file
    try:
        with pytest.raises(HubError, match=r"notes\.txt: a symlink to .*id_ed25519, outside"):
            push_folder(built, "tk-org/leaky", token=TOKEN)
        assert fake_hub.repos == {} and fake_hub.commits == []  # refused before any request
        (built / "notes.txt").unlink()
        push_folder(built, "tk-org/linked", token=TOKEN)
        files = fake_hub.commits[-1]["files"]
        assert files["card.md"] == (built / "README.md").read_bytes()
    finally:
        for name in ("notes.txt", "card.md"):
            (built / name).unlink(missing_ok=True)


def test_push_existing_repo_branch_and_pull_request(fake_hub, built):
    push_folder(built, "tk-org/tiny", token=TOKEN)
    url = push_folder(built, "tk-org/tiny", token=TOKEN, create_pr=True, commit_message="v2")
    assert url == f"{fake_hub.endpoint}/tk-org/tiny/discussions/1"
    assert fake_hub.commits[-1]["create_pr"] and fake_hub.commits[-1]["summary"] == "v2"
    push_folder(built, "tk-org/tiny", token=TOKEN, revision="experiment")
    assert fake_hub.branches == [("tk-org/tiny", "experiment")]
    assert fake_hub.commits[-1]["revision"] == "experiment"
    push_folder(built, "tk-org/tiny", token=TOKEN, revision="experiment")  # it exists now
    assert fake_hub.branches == [("tk-org/tiny", "experiment")]
    assert len(fake_hub.commits) == 4


def test_failed_push_to_a_new_branch_deletes_the_branch(fake_hub, built, monkeypatch):
    """The branch a push made for itself goes when its commit fails; a branch that was
    there before stays."""
    push_folder(built, "tk-org/tiny", token=TOKEN)
    fake_hub.branches.append(("tk-org/tiny", "old"))
    route = fake_hub.route

    def refuse_commits(method, url, body):
        if "/commit/" in url:
            return 500, {"error": "Internal Error (test)"}
        return route(method, url, body)

    monkeypatch.setattr(fake_hub, "route", refuse_commits)
    with pytest.raises(HubError) as info:
        push_folder(built, "tk-org/tiny", token=TOKEN, revision="new")
    assert "the branch 'new', created for this push, was deleted" in str(info.value)
    with pytest.raises(HubError) as info:
        push_folder(built, "tk-org/tiny", token=TOKEN, revision="old")
    assert "deleted" not in str(info.value)
    assert fake_hub.branches == [("tk-org/tiny", "old")] and len(fake_hub.commits) == 1


def test_token_from_env_then_saved_login(fake_hub, built, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "hf_fromEnvironment")
    push_folder(built, "tk-org/a")
    assert fake_hub.requests[-1]["headers"]["authorization"] == "Bearer hf_fromEnvironment"
    monkeypatch.delenv("HF_TOKEN")
    saved = tmp_path / "token"
    saved.write_text("hf_savedLogin\n")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(saved))
    push_folder(built, "tk-org/b")
    assert fake_hub.requests[-1]["headers"]["authorization"] == "Bearer hf_savedLogin"
    push_folder(built, "tk-org/c", token="hf_argumentWins")
    assert fake_hub.requests[-1]["headers"]["authorization"] == "Bearer hf_argumentWins"


def test_no_token_is_a_clear_error(fake_hub, built, capsys):
    with pytest.raises(HubError, match="no Hugging Face token.*HF_TOKEN.*hf auth login"):
        push_folder(built, "tk-org/tiny")
    assert cli.main(["push", str(built), "tk-org/tiny"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err
    assert fake_hub.requests == []


@pytest.mark.parametrize(
    "repo_id, why",
    [
        ("tk-org/bad name", "invalid repo id 'tk-org/bad name'"),
        ("a/b/c", "one '/'"),
        ("tk-org/model@main", "revision"),
        ("tk-org/bad--name", "invalid repo id"),
        ("", "empty"),
    ],
)
def test_invalid_repo_id(fake_hub, built, repo_id, why):
    with pytest.raises(HubError, match=re.escape(why)):
        push_folder(built, repo_id, token=TOKEN)
    assert fake_hub.requests == []


def test_folder_that_is_not_a_built_checkpoint(fake_hub, built, tmp_path, capsys):
    with pytest.raises(CheckpointError, match="no such directory"):
        push_folder(tmp_path / "missing", "tk-org/x", token=TOKEN)
    plain = tmp_path / "plain"
    shutil.copytree(built, plain)
    (plain / "recipe.yaml").unlink()
    with pytest.raises(
        CheckpointError, match=r"plain: not a checkpoint built by tailorkit \(no recipe"
    ):
        push_folder(plain, "tk-org/x", token=TOKEN)
    broken = tmp_path / "broken"
    shutil.copytree(built, broken)
    shard = sorted(broken.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    with pytest.raises(CheckpointError, match="broken: not a valid built checkpoint"):
        push_folder(broken, "tk-org/x", token=TOKEN)
    assert cli.main(["push", str(plain), "tk-org/x", "--token", TOKEN]) == 2
    err = capsys.readouterr().err
    assert "not a checkpoint built by tailorkit" in err and TOKEN not in err
    assert fake_hub.requests == []


def test_hub_refusal_names_repo_and_hides_token(fake_hub, built, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)

    def refuse(method, url, body):
        return 401, {"error": f"Invalid credentials in Authorization header (got {TOKEN})"}

    monkeypatch.setattr(fake_hub, "route", refuse)
    with pytest.raises(HubError) as info:
        push_folder(built, "tk-org/tiny", token=TOKEN)
    text = str(info.value)
    assert "tk-org/tiny" in text and "token was refused" in text
    assert TOKEN not in text and info.value.__cause__ is None and info.value.__context__ is None
    assert TOKEN not in caplog.text


def test_xet_is_the_default_and_its_failure_leaves_nothing(fake_hub, built, monkeypatch):
    """With hf_xet installed, huggingface_hub uploads over Xet; the fake Hub does not speak
    it, so the push fails: the repo it made is deleted again, nothing is committed, and the
    message says how to fall back to LFS (and that fallback then works)."""
    pytest.importorskip("hf_xet")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)  # huggingface_hub's default
    with pytest.raises(HubError) as info:
        push_folder(built, "tk-org/xet", token=TOKEN)
    text = str(info.value)
    assert any("/xet-write-token/" in r["path"] for r in fake_hub.requests)
    assert (
        "HF_HUB_DISABLE_XET=1" in text and "tk-org/xet, created for this push, was deleted" in text
    )
    assert TOKEN not in text
    assert fake_hub.repos == {} and fake_hub.commits == [] and fake_hub.lfs == {}

    fake_hub.repos["tk-org/kept"] = {"visibility": None, "type": "model"}
    with pytest.raises(HubError, match="HF_HUB_DISABLE_XET=1") as info:
        push_folder(built, "tk-org/kept", token=TOKEN)
    assert "deleted" not in str(info.value) and "tk-org/kept" in fake_hub.repos  # not ours

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    push_folder(built, "tk-org/xet", token=TOKEN)
    assert [c["repo"] for c in fake_hub.commits] == ["tk-org/xet"]


def test_cli_push(fake_hub, built, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert cli.main(["push", str(built), "tk-org/cli-model", "--private"]) == 0
    out = capsys.readouterr()
    assert "/tk-org/cli-model/commit/" in out.out and TOKEN not in out.out + out.err
    assert fake_hub.repos["tk-org/cli-model"]["visibility"] == "private"
    assert len(fake_hub.commits) == 1 and "README.md" in fake_hub.commits[0]["files"]


def test_prune_result_push_to_hub(fake_hub, family):
    from tailorkit.result import PruneResult

    result = PruneResult(recipe=_recipe(family.base), report={"method": "shortgpt"})
    url = result.push_to_hub("tk-org/pruned", token=TOKEN)
    assert "/tk-org/pruned/commit/" in url and len(fake_hub.commits) == 1
    files = fake_hub.commits[0]["files"]
    assert {"config.json", "recipe.yaml", "README.md", "model.safetensors"} <= set(files)
    card = ModelCard(files["README.md"].decode())
    assert "shortgpt" in card.data.to_dict()["tags"] and "arXiv:2403.03853" in card.text
    assert tk.Recipe.from_dict(yaml.safe_load(files["recipe.yaml"])) == result.recipe


def test_healed_model_push_to_hub(fake_hub, family, tmp_path):
    """tk.prune(...).heal(...).push_to_hub(...): the healed checkpoint, its heal.json, loss
    curve and a card that says the weights were trained after the recipe; and a model healed
    without a recipe (a plain folder) pushes too."""
    text = "The quick brown fox jumps over the lazy dog, and then it rests a while.\n" * 60
    healed = tk.heal(
        _recipe(family.base), data=[text], steps=1, seq_len=32, held_back=2, progress=False
    )
    url = healed.push_to_hub("tk-org/healed", token=TOKEN)
    assert "/tk-org/healed/commit/" in url
    files = fake_hub.commits[-1]["files"]
    assert {"heal.json", "loss_curve.png", "recipe.yaml", "model.safetensors"} <= set(files)
    card = ModelCard(files["README.md"].decode())
    assert "trained after the recipe" in card.text and "## Healing" in card.text
    plain = healed.save_pretrained(tmp_path / "plain")
    (plain / "recipe.yaml").unlink()
    again = tk.heal(
        plain, teacher=family.base, data=[text], steps=1, seq_len=32, held_back=2, progress=False
    )
    assert again.recipe is None and "## Healing" in str(again.model_card())
    push_folder(again.save_pretrained(tmp_path / "again"), "tk-org/healed-2", token=TOKEN)
    assert "heal.json" in fake_hub.commits[-1]["files"]


# --------------------------------------------------------------------------- model card


def _hub_cache(tmp_path: Path, repo_id: str, model_dir: Path, readme: str | None = None) -> None:
    """Place ``model_dir`` in a Hub cache as the snapshot of ``repo_id`` at main."""
    root = tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(model_dir, root / "snapshots" / commit)
    if readme is not None:
        (root / "snapshots" / commit / "README.md").write_text(readme)


def test_card_metadata_from_hub_models_round_trips(family, tmp_path, monkeypatch):
    _hub_cache(tmp_path, "tk-org/tiny-base", family.base, "---\nlicense: mit\n---\n# base\n")
    _hub_cache(tmp_path, "tk-org/tiny-ft", family.candidates[0])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    recipe = tk.Recipe.from_dict(
        {
            "models": {"base": "tk-org/tiny-base", "ft": "tk-org/tiny-ft"},
            "layers": [
                {"from": "base", "layers": [0, 2]},
                {"from": "ft", "layer": 2},
                {
                    "merge": "linear",
                    "sources": [
                        {"from": "base", "layer": 3, "weight": 0.25},
                        {"from": "ft", "layer": 3, "weight": 0.75},
                    ],
                },
            ],
        }
    )
    evaluation = {
        "model": "out",
        "settings": {"limit": 50},
        "tasks": {"tk_next_line_verse": {"metric": "acc_norm", "acc_norm": 0.45, "samples": 50}},
        "baseline": {
            "model": "base",
            "tasks": {"tk_next_line_verse": {"metric": "acc_norm", "acc_norm": 0.5, "samples": 50}},
        },
    }
    card = make_model_card(
        recipe.plan(),
        method="gptailor",
        settings={"target_ratio": 0.25, "generations": 40},
        report={"best_fitness": 0.0123, "history": [1.0, 0.5]},
        images={"convergence": "search_convergence.png"},
        evaluation=evaluation,
        command="tailorkit prune tk-org/tiny-base --candidates tk-org/tiny-ft",
    )
    path = tmp_path / "README.md"
    card.save(path)
    loaded = ModelCard.load(path)
    meta = loaded.data.to_dict()
    assert meta["base_model"] == ["tk-org/tiny-base", "tk-org/tiny-ft"]
    assert meta["base_model_relation"] == "merge"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "mit"  # carried from the base model's card
    assert {"tailorkit", "gptailor", "merge"} <= set(meta["tags"])
    text = loaded.text
    assert "| 2 | passthrough | ft[2] |" in text
    assert "| 3 | linear | base[3], ft[3] |  | weights 0.25, 0.75 |" in text
    assert "| transformer layers | 4 | 4 | 0 (0.0%) |" in text
    assert "![Search convergence](search_convergence.png)" in text
    assert "| tk_next_line_verse | acc_norm | 50 | 0.4500 | 0.5000 | 90.0% |" in text
    assert "| target_ratio | 0.25 |" in text and "| best_fitness | 0.0123 |" in text
    assert "arXiv:2506.20480" in text and "arXiv:2502.19159" in text
    assert "tailorkit prune tk-org/tiny-base --candidates tk-org/tiny-ft" in text
    # The recipe in the card is the recipe.
    block = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    assert tk.Recipe.from_dict(yaml.safe_load(block)) == recipe


def test_card_of_local_single_model_prune(family):
    plan = _recipe(family.base).plan()
    card = make_model_card(plan, method="slm", license="apache-2.0")
    meta = ModelCard(card.content).data.to_dict()
    assert "base_model" not in meta and "base_model_relation" not in meta  # not on the Hub
    assert meta["license"] == "apache-2.0"
    assert f"local checkpoint `{family.base.name}` (not on the Hub)" in card.text
    # The machine's paths appear only in the recipe (which a rebuild needs), nowhere else.
    outside_recipe = re.sub(r"```yaml\n.*?```", "", card.text, flags=re.S)
    assert str(family.base) in card.text and str(family.base.parent) not in outside_recipe
    assert "| transformer layers | 4 | 2 | 2 (50.0%) |" in card.text
    assert "Sliding Layer Merging" in card.text
    with pytest.raises(HubError, match="relative"):
        make_model_card(plan, images={"similarity": "/etc/passwd"})


@pytest.mark.parametrize(
    ("method", "cited"),
    [
        (None, ["su2025gptailor", "ding2025slm"]),
        ("slm", ["su2025gptailor", "ding2025slm"]),
        ("shortgpt", ["su2025gptailor", "ding2025slm", "men2024shortgpt"]),
        ("laco", ["su2025gptailor", "ding2025slm", "yang2024laco"]),
    ],
)
def test_card_cites_tailorkits_methods_and_the_one_that_made_the_recipe(family, method, cited):
    card = make_model_card(_recipe(family.base).plan(), method=method).text
    assert re.findall(r"```bibtex\n@\w+\{(\w+),", card) == cited


def test_card_single_hub_model_is_finetune_relation(family, tmp_path, monkeypatch):
    _hub_cache(tmp_path, "tk-org/solo", family.base)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    recipe = tk.Recipe.from_dict(
        {"models": {"m": "tk-org/solo"}, "layers": [{"from": "m", "layers": [0, 3]}]}
    )
    meta = make_model_card(recipe).data.to_dict()
    assert meta["base_model"] == ["tk-org/solo"] and meta["base_model_relation"] == "finetune"


def test_build_writes_the_model_card(built):
    card = ModelCard.load(built / "README.md")
    assert "tailorkit" in card.data.to_dict()["tags"]
    assert (
        "## Layer provenance" in card.text
        and "| 2 | task_arithmetic | ft[3] | base[3] |" in card.text
    )
