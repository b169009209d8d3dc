"""The healing loop: student and teacher, the windows, the steps, the checkpoints."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tailorkit.checkpoint.writer import HEAL_FORMAT
from tailorkit.errors import HealError
from tailorkit.healing.losses import TopKCache, kl_full, kl_top_k, next_token_loss, teacher_top_k
from tailorkit.healing.result import HealResult
from tailorkit.healing.settings import (
    CHECKPOINT_PREFIX,
    KEPT_CHECKPOINTS,
    RUN_ONLY,
    HealSettings,
    layer_list,
)

log = logging.getLogger(__name__)


@dataclass
class Student:
    model: Any
    tokenizer: Any
    name: str
    plan: Any  # the Plan of the recipe it was pruned by, when known
    dtype: torch.dtype  # what it was saved in; trained in float32, saved back in this


@dataclass
class Teacher:
    model: Any
    name: str


@dataclass
class Windows:
    train: torch.Tensor  # (N, T) token ids
    held: torch.Tensor  # (K, T), never trained on
    digest: str


def load_student(model, device) -> Student:
    from tailorkit.eval.run import load_model
    from tailorkit.recipe import Recipe

    recipe = None
    if hasattr(model, "recipe") and hasattr(model, "plan"):
        # A PruneResult: a fresh copy of its model, since training changes it in place.
        model = recipe = model.recipe
    elif isinstance(model, Recipe):
        recipe = model
    elif isinstance(model, (str, Path)):
        path = Path(model).expanduser()
        if path.is_file():
            recipe = Recipe.load(path)
        elif (path / "recipe.yaml").is_file():
            recipe = Recipe.load(path / "recipe.yaml")
    plan = None if recipe is None else recipe.plan()  # opens the sources' headers once
    built_dir = isinstance(model, (str, Path)) and Path(model).expanduser().is_dir()
    loaded = load_model(model if plan is None or built_dir else plan, device="cpu")
    name = str(model) if isinstance(model, (str, Path)) else loaded.name
    dtype = next(loaded.model.parameters()).dtype
    return Student(loaded.model, loaded.tokenizer, name, plan, dtype)


def load_teacher(teacher, student: Student, device) -> Teacher:
    from tailorkit.eval.run import load_model

    if teacher is None:
        if student.plan is None:
            raise HealError(
                f"{student.name}: no recipe.yaml beside it, so its dense model is unknown; "
                "name the teacher (--teacher)"
            )
        base = student.plan.base
        teacher, name = base.path, base.ref
    else:
        name = str(teacher)
    loaded = load_model(teacher, device="cpu", dtype="float32")
    loaded.name = name
    mine, theirs = student.tokenizer.get_vocab(), loaded.tokenizer.get_vocab()
    if mine != theirs:
        extra = sorted(set(mine.items()) ^ set(theirs.items()))[:3]
        raise HealError(
            f"teacher {loaded.name}: its tokenizer is not the student's ({len(theirs)} vs "
            f"{len(mine)} tokens; first differences {extra}); distillation compares "
            "next-token distributions, so both must share one vocabulary"
        )
    sizes = (student.model.get_output_embeddings().weight.shape[0],)
    sizes += (loaded.model.get_output_embeddings().weight.shape[0],)
    if sizes[0] != sizes[1]:
        raise HealError(
            f"teacher {loaded.name}: its head has {sizes[1]} outputs, the student's "
            f"{sizes[0]}; both must score the same vocabulary"
        )
    loaded.model.requires_grad_(False)
    return Teacher(loaded.model, loaded.name)


def make_windows(tokenizer, data, config: HealSettings) -> Windows:
    """The data cut into windows of ``seq_len`` tokens; ``held_back`` of them, spread evenly
    through the text, are kept out of training to score on."""
    from tailorkit.calibration import token_windows
    from tailorkit.errors import CalibrationError

    try:
        windows = token_windows(tokenizer, data, seq_len=config.seq_len, num_windows=None)
    except CalibrationError as e:
        raise HealError(f"data: {e}") from None
    n = len(windows)
    if n <= config.held_back:
        raise HealError(
            f"data: {n} windows of {config.seq_len} tokens, and {config.held_back} are held "
            "back for scoring: give more text, a smaller seq_len or a smaller held_back"
        )
    held = torch.linspace(0, n - 1, config.held_back).round().long().unique()
    keep = torch.ones(n, dtype=torch.bool)
    keep[held] = False
    digest = hashlib.sha256(windows.numpy().tobytes()).hexdigest()
    return Windows(windows[keep], windows[held], digest)


def checkpoints_in(folder: Path) -> list[Path]:
    """The state files of the checkpoints in ``folder``, oldest first."""
    return sorted(folder.glob(f"{CHECKPOINT_PREFIX}*/state.json"))


def decoder_layers(model) -> tuple[str, torch.nn.ModuleList]:
    """The name and the list of the decoder layers of a transformers causal LM."""
    from tailorkit.forward import _find_layers

    layers, _ = _find_layers(model)
    name = next(n for n, m in model.named_modules() if m is layers)
    return name, layers


def trained_layers(config: HealSettings, student: Student) -> list[int]:
    _, layers = decoder_layers(student.model)
    spec = layer_list(config.train, len(layers))
    if spec == "all":
        return list(range(len(layers)))
    if spec != "gaps":
        return spec
    if student.plan is None:
        raise HealError(
            f"train gaps: {student.name} has no recipe.yaml, so where layers were removed is "
            "unknown; name the layers (e.g. 5,6,11)"
        )
    from tailorkit.bridges import gaps

    output = student.plan.recipe.output_layers()
    chosen = {i for i, layer in enumerate(output) if layer.bridge}
    for j, _, _ in gaps(output, student.plan.base.num_layers):
        chosen |= {j, j + 1} & set(range(len(output)))
    if not chosen:
        raise HealError(f"train gaps: {student.name}'s recipe removes no layers")
    return sorted(chosen)


def _linear_names(model, indices: list[int]) -> list[str]:
    prefix, layers = decoder_layers(model)
    names = []
    for i in indices:
        for name, module in layers[i].named_modules():
            if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
                names.append(f"{prefix}.{i}.{name}")
    return names


class Trainer:
    def __init__(self, student, teacher, windows, config, folder, device, progress):
        from accelerate import Accelerator

        from tailorkit.devices import resolve_device

        target = resolve_device(device)
        cuda = target.type == "cuda"
        self.acc = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")
        self.student, self.teacher, self.windows = student, teacher, windows
        self.config, self.folder, self.progress = config, Path(folder), progress
        self.layers = trained_layers(config, student)
        model = student.model.float()
        torch.manual_seed(config.seed)
        if config.full:
            model.requires_grad_(False)
            _, layers = decoder_layers(model)
            for i in self.layers:
                layers[i].requires_grad_(True)
        else:
            from peft import LoraConfig, get_peft_model

            targets = _linear_names(model, self.layers)
            lora = LoraConfig(
                r=config.lora_rank,
                lora_alpha=2 * config.lora_rank,
                lora_dropout=0.0,
                target_modules=targets,
                # GPT-2's Conv1D stores its weight transposed.
                fan_in_fan_out=type(model.get_submodule(targets[0])).__name__ == "Conv1D",
            )
            with warnings.catch_warnings():  # peft asks transformers a deprecated question
                warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
                model = get_peft_model(model, lora)
        if cuda:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        self.params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=0.0)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.model.train()
        device = self.acc.device
        self.teacher_model = teacher.model.to(device, torch.bfloat16 if cuda else torch.float32)
        self.teacher_model.eval()
        self.step, self.tokens, self.train_seconds = 0, 0, 0.0
        self.history: list[dict] = []
        self.checkpoints: list[int] = []
        self.stopped = "steps"
        self.cache = self._cache()

    # -- identity of a run, for --resume ---------------------------------------------------
    def identity(self) -> dict:
        plan = self.student.plan
        return {
            "settings": self.config.model_dump(exclude=set(RUN_ONLY)),
            "student": plan.recipe.fingerprint() if plan is not None else self.student.name,
            "teacher": self.teacher.name,
            "data": self.windows.digest,
            "processes": self.acc.num_processes,
        }

    def _cache(self) -> TopKCache | None:
        c = self.config
        repeats = c.steps * c.batch_size > len(self.windows.train)
        wanted = c.teacher_cache == "on" or (c.teacher_cache == "auto" and repeats)
        if c.top_k is None or c.kl_weight == 0 or not wanted:
            return None
        key = f"{self.teacher.name}|{self.windows.digest}|{c.top_k}|{c.temperature}|{c.seq_len}"
        name = "teacher-top-k-" + hashlib.sha256(key.encode()).hexdigest()[:16]
        shape = (len(self.windows.train), c.seq_len, c.top_k)
        if self.acc.is_main_process:
            TopKCache(self.folder / name, *shape)  # created once, before the others open it
        self.acc.wait_for_everyone()
        return TopKCache(self.folder / name, *shape)

    # -- one step --------------------------------------------------------------------------
    def rows(self, step: int) -> list[int]:
        """The training windows of ``step`` (from 1): a fresh seeded permutation each epoch,
        so the batch depends on the seed and the step only; this process's share of it."""
        n, size = len(self.windows.train), self.config.batch_size
        rows = []
        for position in range((step - 1) * size, step * size):
            epoch, i = divmod(position, n)
            order = torch.randperm(
                n, generator=torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            )
            rows.append(int(order[i]))
        return rows[self.acc.process_index :: self.acc.num_processes]

    @torch.no_grad()
    def teacher_logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.teacher_model(input_ids=ids.to(self.acc.device)).logits

    def loss(self, rows: list[int]) -> torch.Tensor:
        c, ids = self.config, self.windows.train[rows].to(self.acc.device)
        with self.acc.autocast():
            logits = self.model(input_ids=ids).logits
        loss = torch.zeros((), device=ids.device)
        if c.kl_weight > 0:
            if c.top_k is None:
                kl = kl_full(logits, self.teacher_logits(ids), c.temperature)
            else:
                if self.cache is not None:
                    top = self.cache.get(rows, self._top_k_of)
                else:
                    top = teacher_top_k(self.teacher_logits(ids), c.top_k, c.temperature)
                kl = kl_top_k(logits, *(t.to(ids.device) for t in top), c.temperature)
            loss = loss + c.kl_weight * kl
        if c.kl_weight < 1:
            loss = loss + (1 - c.kl_weight) * next_token_loss(logits, ids)
        return loss

    def _top_k_of(self, rows: list[int]):
        c = self.config
        return teacher_top_k(self.teacher_logits(self.windows.train[rows]), c.top_k, c.temperature)

    @torch.no_grad()
    def held_back(self, model, kl: bool = True) -> dict[str, float]:
        """Next-token loss and (with ``kl``) KL to the teacher (temperature 1, whole
        vocabulary) on the held-back windows."""
        was_training = model.training
        model.eval()
        held, size = self.windows.held, self.config.batch_size
        out = {"held_back_loss": 0.0} | ({"held_back_kl": 0.0} if kl else {})
        for i in range(0, len(held), size):
            ids = held[i : i + size].to(self.acc.device)
            with self.acc.autocast():
                logits = model(input_ids=ids).logits
            out["held_back_loss"] += next_token_loss(logits, ids).item() * len(ids)
            if kl:
                out["held_back_kl"] += kl_full(logits, self.teacher_logits(ids)).item() * len(ids)
        model.train(was_training)
        return {name: total / len(held) for name, total in out.items()}

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> None:
        c = self.config
        started = time.perf_counter()
        if self.step == 0:
            self.history.append({"step": 0, **self.held_back(self.model)})
        bar = tqdm(
            total=c.steps,
            initial=self.step,
            desc="heal",
            unit="step",
            disable=not self.progress or not self.acc.is_main_process,
        )
        try:
            while self.step < c.steps:
                if c.max_minutes is not None and time.perf_counter() - started > 60 * c.max_minutes:
                    self.stopped = "time"
                    break
                self._one_step(bar)
        except KeyboardInterrupt as e:
            e.kept = self._kept()
            raise
        finally:
            bar.close()

    def _one_step(self, bar) -> None:
        c, s = self.config, self.step + 1
        t0 = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = c.lr_at(s)
        rows = self.rows(s)
        loss = self.loss(rows)
        if not torch.isfinite(loss):
            raise HealError(f"the loss became {loss.item()} at step {s}; {self._kept()}")
        self.acc.backward(loss)
        self.acc.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.train_seconds += time.perf_counter() - t0
        self.step = s
        self.tokens += c.batch_size * c.seq_len
        entry = {"step": s, "loss": loss.item(), "lr": c.lr_at(s)}
        if s % c.eval_every == 0 or s == c.steps:
            entry |= self.held_back(self.model)
        self.history.append(entry)
        if s % c.checkpoint_every == 0:
            self.save()
        bar.update(1)
        bar.set_postfix(loss=f"{entry['loss']:.3f}")

    def _kept(self) -> str:
        if not self.checkpoints:
            return "no checkpoint was written yet"
        step = self.checkpoints[-1]
        where = self.folder / f"{CHECKPOINT_PREFIX}{step:06d}"
        return f"the checkpoint of step {step} is kept in {where}: rerun with --resume"

    # -- checkpoints -----------------------------------------------------------------------
    def save(self) -> None:
        from safetensors.torch import save_file

        from tailorkit.checkpoint.writer import atomic_directory

        model = self.acc.unwrap_model(self.model)
        trained = {
            n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
        }
        target = self.folder / f"{CHECKPOINT_PREFIX}{self.step:06d}"
        if self.acc.is_main_process:
            shutil.rmtree(target, ignore_errors=True)
            state = {
                "format": "tailorkit heal checkpoint",
                "step": self.step,
                "tokens": self.tokens,
                "train_seconds": self.train_seconds,
                "history": self.history,
                "identity": self.identity(),
            }
            try:
                with atomic_directory(target) as tmp:
                    save_file(trained, tmp / "trained.safetensors")
                    torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
                    (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
            except OSError as e:
                why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
                raise HealError(f"checkpoint {target}: write failed ({why}); {self._kept()}") from e
            self.checkpoints.append(self.step)
            for old in self.checkpoints[:-KEPT_CHECKPOINTS]:
                shutil.rmtree(self.folder / f"{CHECKPOINT_PREFIX}{old:06d}", ignore_errors=True)
            self.checkpoints = self.checkpoints[-KEPT_CHECKPOINTS:]
        self.acc.wait_for_everyone()

    def resume(self) -> None:
        """Continue from the newest checkpoint in the folder (start afresh if there is none)."""
        from safetensors.torch import load_file

        found = checkpoints_in(self.folder)
        if not found:
            log.warning("%s: no checkpoint yet; starting from step 0", self.folder)
            return
        where = found[-1].parent
        state = json.loads(found[-1].read_text())
        mine = self.identity()
        theirs = state.get("identity", {})
        differ = [k for k in mine if k != "settings" and theirs.get(k) != mine[k]]
        differ += [k for k, v in mine["settings"].items() if theirs.get("settings", {}).get(k) != v]
        if differ:
            raise HealError(
                f"{where}: a checkpoint of another run ({', '.join(differ)} differ); resume "
                "with the same settings, model, teacher and data, or use another --out"
            )
        model = self.acc.unwrap_model(self.model)
        trained = load_file(where / "trained.safetensors")
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        if set(trained) != names:
            raise HealError(f"{where}: its trained tensors are not this run's")
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, tensor in trained.items():
                params[name].copy_(tensor)
        self.optimizer.load_state_dict(torch.load(where / "optimizer.pt", weights_only=True))
        self.step, self.tokens = state["step"], state["tokens"]
        self.train_seconds, self.history = state["train_seconds"], state["history"]
        self.checkpoints = sorted(int(p.parent.name.removeprefix(CHECKPOINT_PREFIX)) for p in found)
        log.warning("resuming from %s (step %d)", where, self.step)

    # -- the result ------------------------------------------------------------------------
    def result(self, scratch: Path, data) -> HealResult:
        from tailorkit.healing.plot import loss_curve

        model = self.acc.unwrap_model(self.model)
        if not self.config.full:
            model = model.merge_and_unload()
        after = self.held_back(model)
        dense = self.held_back(self.teacher_model, kl=False)["held_back_loss"]
        model = model.to("cpu", self.student.dtype).eval()
        before = self.history[0]
        c = self.config
        report = {
            "format": HEAL_FORMAT,
            "student": self.student.name,
            "teacher": self.teacher.name,
            "data": "bundled calibration text" if data is None else str(data),
            "mode": "full" if c.full else f"LoRA rank {c.lora_rank}",
            "trained_layers": self.layers,
            "trainable_parameters": sum(p.numel() for p in self.params),
            "settings": c.model_dump(),
            "learning_rate": c.lr,
            "steps": self.step,
            "stopped": self.stopped,
            "tokens_seen": self.tokens,
            "train_seconds": round(self.train_seconds, 1),
            "tokens_per_second": round(self.tokens / max(self.train_seconds, 1e-9), 1),
            "held_back": {
                "windows": len(self.windows.held),
                "tokens": int(self.windows.held.numel()),
                "teacher_ppl": _ppl(dense),
                "before_ppl": _ppl(before["held_back_loss"]),
                "after_ppl": _ppl(after["held_back_loss"]),
                "before_kl": round(before["held_back_kl"], 5),
                "after_kl": round(after["held_back_kl"], 5),
            },
            "history": self.history,
        }
        images = {"Healing loss": loss_curve(self.history, scratch / "loss_curve.png")}
        recipe = None if self.student.plan is None else self.student.plan.recipe
        return HealResult(model, self.student.tokenizer, report, recipe, images)


def _ppl(loss: float) -> float:
    return round(float(torch.tensor(loss).exp()), 3)
