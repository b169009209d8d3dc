"""Publishing on the Hugging Face Hub: the upload of a built folder.

``push_folder(folder, repo_id, ...)`` checks that ``folder`` is a checkpoint built by
tailorkit, creates the repo if needed and uploads the whole folder as one commit
(huggingface_hub moves the shards through LFS / Xet).  The token comes from the
argument, else ``HF_TOKEN``, else the saved login, and is never written to a file, a
log record or an error message. The model card is :mod:`tailorkit.card`'s.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from tailorkit.checkpoint.writer import is_heal_output
from tailorkit.errors import CheckpointError, HubError, RecipeError
from tailorkit.recipe import Recipe

log = logging.getLogger(__name__)


def check_built_folder(folder: str | Path) -> Path:
    """Raise unless ``folder`` is a checkpoint built by tailorkit (weights, config, recipe)."""
    from tailorkit.checkpoint.source import Source

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such directory")
    missing = [n for n in ("config.json", "recipe.yaml") if not (folder / n).is_file()]
    if missing == ["recipe.yaml"] and is_heal_output(folder):
        missing = []  # healed from a model without a recipe: heal.json says what was done
    if missing:
        raise CheckpointError(
            f"{folder}: not a checkpoint built by tailorkit (no {' or '.join(missing)}); "
            "build one with `tailorkit build RECIPE DIR` or PruneResult.save_pretrained"
        )
    try:
        if (folder / "recipe.yaml").is_file():
            Recipe.load(folder / "recipe.yaml")
        Source(str(folder))  # config.json + every shard header, strictly
    except (CheckpointError, RecipeError) as e:
        raise type(e)(f"{folder}: not a valid built checkpoint: {e}") from None
    return folder


def folder_files(folder: Path) -> list[str]:
    """Every file under ``folder`` (POSIX paths relative to it) but VCS and cache folders.

    A symlink that leads out of ``folder`` is refused: uploading it would publish
    whatever it points at (a key, a token file) under an innocent name.
    """
    skip = {".git", ".cache", "__pycache__"}
    root = folder.resolve()
    files = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if skip.intersection(rel.parts) or not p.is_file():
            continue
        if p.is_symlink() and not p.resolve().is_relative_to(root):
            raise HubError(
                f"{p}: a symlink to {p.resolve()}, outside {folder}; refusing to upload it "
                "(copy the file into the folder if it belongs there)"
            )
        files.append(rel.as_posix())
    return sorted(files)


def check_repo_id(repo_id: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or not repo_id.strip():
        raise HubError("repo id is empty; give 'namespace/name', e.g. 'me/smollm2-22L'")
    if "@" in repo_id:
        raise HubError(
            f"invalid repo id {repo_id!r}: a revision is not part of the id; "
            "pass it separately (revision=, --revision)"
        )
    if repo_id.count("/") > 1:
        raise HubError(f"invalid repo id {repo_id!r}: the form is 'namespace/name' (one '/')")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        reason = str(e).split("\n")[0]
        raise HubError(
            f"invalid repo id {repo_id!r}: {reason} (letters, digits, '-', '_', '.'; "
            "at most 96 characters; no '--' or '..')"
        ) from None
    return repo_id


def resolve_token(token: str | None = None) -> str:
    """The token: the argument, else ``HF_TOKEN``, else the saved login."""
    if token:
        return token
    env = os.environ.get("HF_TOKEN", "").strip()
    if env:
        return env
    from huggingface_hub import get_token

    saved = get_token()
    if saved:
        return saved
    raise HubError(
        "no Hugging Face token: pass token= (--token), set HF_TOKEN, or log in once with "
        "`hf auth login`; a token with write access is needed to push"
    )


def _uploads_over_xet() -> bool:
    """What huggingface_hub decides by itself: Xet when hf_xet is installed and not disabled."""
    import importlib.util

    from huggingface_hub import constants

    return not constants.HF_HUB_DISABLE_XET and importlib.util.find_spec("hf_xet") is not None


def _remove_new_repo(api, repo_id: str, secret: str) -> str:
    """Delete the repo this push created before it failed: a failed push leaves nothing."""
    try:
        api.delete_repo(repo_id, repo_type="model")
    except Exception as e:
        return (
            f"The repo {repo_id} was created for this push and is still there, empty; deleting "
            f"it failed too ({type(e).__name__}: {_scrub(str(e), secret)}): delete it by hand."
        )
    return f"Nothing was committed, and the repo {repo_id}, created for this push, was deleted."


def _create_branch(api, repo_id: str, branch: str) -> bool:
    """Create ``branch`` from main unless it exists; whether this call created it."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.create_branch(repo_id, branch=branch)
    except HfHubHTTPError as e:
        if e.response is not None and e.response.status_code == 409:  # it exists already
            return False
        raise
    return True


def _remove_new_branch(api, repo_id: str, branch: str, secret: str) -> str:
    """Delete the branch this push created before it failed: a failed push leaves nothing."""
    try:
        api.delete_branch(repo_id, branch=branch, repo_type="model")
    except Exception as e:
        return (
            f"The branch {branch!r} of {repo_id} was created for this push and is still there; "
            f"deleting it failed too ({type(e).__name__}: {_scrub(str(e), secret)}): delete it "
            "by hand."
        )
    return f"Nothing was committed, and the branch {branch!r}, created for this push, was deleted."


def _scrub(text: str, token: str) -> str:
    return text.replace(token, "***") if token else text


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload a built folder to ``repo_id`` as one commit; returns the commit (or PR) URL.

    The repo is created if it does not exist (``private`` applies then); ``revision``
    names a branch, created from main when missing; ``create_pr`` opens a pull request
    instead of committing to the branch.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = check_built_folder(folder)
    check_repo_id(repo_id)
    files = folder_files(folder)  # before the repo is created: a refused link stops it all
    secret = resolve_token(token)
    api = HfApi(token=secret)
    message = commit_message or f"Upload {folder.name} (built with tailorkit)"
    failure: str | None = None
    created = branched = uploading = False
    full_id = repo_id
    try:
        existed = api.repo_exists(repo_id, repo_type="model")
        full_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id or repo_id
        created = not existed
        if revision and revision != "main" and not revision.startswith("refs/pr/"):
            branched = _create_branch(api, full_id, revision)
        # create_commit, not upload_folder: with hf_xet installed, upload_folder may split
        # a large folder into several commits; this is always exactly one.
        uploading = True
        info = api.create_commit(
            repo_id=full_id,
            operations=[
                CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(folder / rel))
                for rel in files
            ],
            commit_message=message,
            revision=revision,
            create_pr=create_pr,
        )
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        hint = {
            401: "the token was refused; check it (HF_TOKEN / `hf auth login`)",
            403: "the token may not write to this namespace; use a write token",
            404: "the repo or revision was not found",
        }.get(status, "")
        detail = _scrub(str(e).split("\n")[0], secret)
        failure = detail + (f" ({hint})" if hint else "")
    except Exception as e:
        # The transport's own errors (requests, httpx or httpx2, by huggingface_hub version:
        # a refused connection, a timeout, a bad endpoint) share no base class with OSError;
        # hf_xet raises its own.
        failure = f"{type(e).__name__}: {_scrub(str(e), secret)}"
    if failure is not None:
        if uploading and _uploads_over_xet():
            failure += (
                ". The files went over Xet (hf_xet is installed, huggingface_hub's default); "
                "if this endpoint or a proxy on the way does not speak Xet, set "
                "HF_HUB_DISABLE_XET=1 to upload over plain LFS."
            )
        if created:
            failure += " " + _remove_new_repo(api, full_id, secret)
        elif branched:
            failure += " " + _remove_new_branch(api, full_id, revision, secret)
        # Raised outside the handler: the original error, which may quote the token back
        # from the server, is not kept even as __context__.
        raise HubError(f"pushing {folder} to {repo_id} failed: {failure}")
    result = info.pr_url if create_pr and info.pr_url else info.commit_url
    log.info("pushed %s to %s: %s", folder, full_id, result)
    return str(result)
