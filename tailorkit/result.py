"""PruneResult: what :func:`tailorkit.prune` returns.

The plan (a Recipe) and the figures that justify it, plus the ways to use it:
the model in memory, a checkpoint on disk with its model card, a Hub repo.
"""

from __future__ import annotations

import shlex
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from tailorkit.recipe import Recipe


@dataclass
class PruneResult:
    recipe: Recipe
    report: dict[str, Any] = field(default_factory=dict)
    images: dict[str, Path] = field(default_factory=dict)  # caption -> PNG
    evaluation: dict[str, Any] | None = None  # set by tailorkit.evaluate(result, ...)
    command: str | None = None  # the CLI line that produced it, for the model card
    files: dict[str, Path] = field(default_factory=dict)  # shipped too (e.g. the search log)
    scratch: Any = field(default=None, repr=False)  # a TemporaryDirectory the files live in

    @cached_property
    def plan(self):
        return self.recipe.plan()

    @cached_property
    def model(self):
        """The pruned model, assembled in memory (no disk write)."""
        from tailorkit.assembly import assemble

        return assemble(self.plan)

    def summary(self) -> str:
        return self.plan.summary()

    def model_card(self):
        """The model card (``huggingface_hub.ModelCard``) that save_pretrained writes."""
        from tailorkit.card import make_model_card

        settings = dict(self.report.get("settings", {}))
        return make_model_card(
            self.plan,
            method=self.report.get("method"),
            settings=settings,
            report=self.report,
            images={caption: path.name for caption, path in self.images.items()},
            evaluation=self.evaluation,
            command=self.command,
        )

    def save_pretrained(
        self,
        out_dir: str | Path,
        *,
        shard_size: str | int = "5GB",
        overwrite: bool = False,
        progress: bool = True,
    ) -> Path:
        """Stream the checkpoint to ``out_dir`` with recipe.yaml, README.md (the model
        card), report.json and the figures; atomically, like :func:`tailorkit.build`."""
        import json

        from tailorkit.builder import build

        extra = {path.name: path for path in self.images.values()} | dict(self.files)
        report = json.dumps(self.report, indent=1, default=str) + "\n"
        return build(
            self.plan,
            out_dir,
            shard_size=shard_size,
            overwrite=overwrite,
            progress=progress,
            readme=str(self.model_card()),
            extra_files=extra,
            extra_texts={"report.json": report},
        )

    def heal(self, **kwargs):
        """Distil the dense model back into this one (see :func:`tailorkit.heal`);
        returns a HealResult, which saves and pushes like this."""
        from tailorkit.healing import heal

        return heal(self, **kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        token: str | None = None,
        commit_message: str | None = None,
    ) -> str:
        """Build into a scratch folder and upload it as one commit; returns the commit URL."""
        from tailorkit.hub import push_folder

        with tempfile.TemporaryDirectory(prefix="tailorkit-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "model", progress=False)
            return push_folder(
                folder,
                repo_id,
                private=private,
                revision=revision,
                create_pr=create_pr,
                token=token,
                commit_message=commit_message or f"tailorkit: {self.summary()}",
            )


def command_line(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in ["tailorkit", *argv])
