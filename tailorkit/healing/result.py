"""HealResult: what :func:`tailorkit.heal` returns."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tailorkit.checkpoint.writer import HEAL_FILE
from tailorkit.errors import HealError


@dataclass
class HealResult:
    """The healed model in memory, how the run went, and ways to save or share it."""

    model: Any
    tokenizer: Any
    report: dict[str, Any]
    recipe: Any = None  # the recipe the student was built from, when known
    images: dict[str, Path] = field(default_factory=dict)
    scratch: Any = field(default=None, repr=False)  # a TemporaryDirectory holding images
    is_main: bool = True  # False in the other processes of an `accelerate launch`

    def model_card(self):
        from tailorkit.card import make_heal_card

        images = {caption: path.name for caption, path in self.images.items()}
        return make_heal_card(self.recipe, self.report, images)

    def save_pretrained(self, out_dir: str | Path, *, overwrite: bool = False) -> Path:
        """A standard transformers checkpoint with its model card, heal.json, the loss
        curve and (when known) the recipe it was pruned by; atomically."""
        from tailorkit.checkpoint.writer import atomic_directory, umask

        out = Path(out_dir)
        try:
            with atomic_directory(out, overwrite) as tmp:
                self.model.save_pretrained(tmp, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)
                (tmp / "README.md").write_text(str(self.model_card()))
                (tmp / HEAL_FILE).write_text(json.dumps(self.report, indent=1) + "\n")
                for path in self.images.values():
                    shutil.copyfile(path, tmp / path.name)
                if self.recipe is not None:
                    self.recipe.save(tmp / "recipe.yaml")
                mode = 0o666 & ~umask()
                for path in tmp.iterdir():  # transformers writes some files private
                    path.chmod(mode)
        except OSError as e:
            raise HealError(f"{out}: write failed ({e.strerror or e}); nothing was written") from e
        return out

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token=None, **kw) -> str:
        """Save into a scratch folder and upload it as one commit; returns the commit URL."""
        from tailorkit.hub import push_folder

        with tempfile.TemporaryDirectory(prefix="tailorkit-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "model")
            message = kw.pop("commit_message", None) or "tailorkit heal"
            return push_folder(
                folder, repo_id, private=private, token=token, commit_message=message, **kw
            )
