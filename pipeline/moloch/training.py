"""LoRA fine-tuning of a player on a training set (docs/protocol.md §5), with TRL's SFTTrainer.

Every hyperparameter comes from ``profile.training``; CPU and GPU runs differ
only by profile settings (``bf16``, ``gradient_checkpointing``, ``max_steps``).
The adapter is trained into ``<out_dir>.tmp`` and renamed to ``out_dir`` only
when complete, so an interrupted run never leaves a half adapter behind.

Prompts are rendered with the player's chat template into text before TRL
sees them, as the authors' ``train.py`` received them (pre-templated prompt
strings, raw completions; TRL appends the EOS token). This keeps the
completion byte-identical to what was generated (Qwen3's template would
rewrite a ``<think>`` block inside an assistant turn). Loss is on the
completion only: TRL's default for prompt-completion data, set explicitly.

    python -m moloch.training --profile smoke --rows trainset.jsonl --out adapter_dir
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from .config import PlayerSpec, Profile, load_profile
from .errors import DataError, ModelError
from .files import read_json, read_jsonl, write_json
from .hashing import object_sha256
from .llm.adapters import SUMMARY, adapter_files, adapter_sha256

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what peft must write
SUMMARY_FILE = SUMMARY  # the adapter hash recorded here is checked at every use


# --- inputs --------------------------------------------------------------------


def _check_rows(rows: Sequence[dict]) -> None:
    if not rows:
        raise DataError("the training set is empty: build it first (trainsets stage)")
    for i, row in enumerate(rows):
        prompt, completion = row.get("prompt"), row.get("completion")
        ok = (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in prompt)
            and isinstance(completion, list)
            and len(completion) == 1
            and isinstance(completion[0], dict)
            and isinstance(completion[0].get("content"), str)
        )
        if not ok:
            raise DataError(
                f"training row {i} (anchor {row.get('anchor_id')}) is not a conversational "
                f"prompt-completion row: expected 'prompt' (list of messages) and 'completion' "
                f"(one assistant message); rebuild the training set"
            )


def render_rows(tokenizer, rows: Sequence[dict], enable_thinking: bool | None) -> list[dict]:
    """Rows as text: the chat-templated prompt (generation prompt on) and the raw completion."""
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    # Drop the template's BOS when the tokenizer adds its own, so it is not doubled.
    bos = tokenizer.bos_token
    adds_bos = bool(tokenizer(text="")["input_ids"])
    rendered = []
    for row in rows:
        text = tokenizer.apply_chat_template(
            row["prompt"], tokenize=False, add_generation_prompt=True, **kwargs
        )
        if adds_bos and bos and text.startswith(bos):
            text = text[len(bos) :]
        rendered.append({"prompt": text, "completion": row["completion"][0]["content"]})
    return rendered


# --- outputs -------------------------------------------------------------------


def load_train_summary(out_dir: str | Path) -> dict | None:
    """The summary of a complete adapter in ``out_dir`` whose files match their hash, else None."""
    out_dir = Path(out_dir)
    try:
        summary = read_json(out_dir / SUMMARY_FILE, "training summary")
        digest = adapter_sha256(out_dir)
    except (DataError, ModelError):
        return None
    return summary if summary.get("adapter_sha256") == digest else None


def _install(tmp: Path, out_dir: Path) -> None:
    """Move a finished adapter into place; an older one is replaced only after."""
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


# --- training ------------------------------------------------------------------


def _portable_base_name(spec: PlayerSpec, resolved: Path | str) -> str:
    # The embedded checkpoint lives in a per-user cache; record its folder name, not the path,
    # so that the adapter (and its hash) does not depend on who trained it.
    return Path(resolved).name if spec.model == "embedded" else str(resolved)


def _checkpointing_field(config_class) -> str:
    """The training argument that turns gradient checkpointing on: ``activation_checkpointing``
    from transformers 5.23 (the CPU environment), ``gradient_checkpointing`` before it (5.19
    and 5.20 in the vLLM environments; 5.23 keeps it as a deprecated alias)."""
    import dataclasses

    names = {field.name for field in dataclasses.fields(config_class)}
    return (
        "activation_checkpointing"
        if "activation_checkpointing" in names
        else ("gradient_checkpointing")
    )


def build_trainer(
    profile: Profile, player_spec: PlayerSpec, rows: Sequence[dict], work_dir: Path, seed: int
):
    """An SFTTrainer for ``rows`` with the profile's LoRA and schedule, ready to ``train()``.

    Returns ``(trainer, info)``; ``info`` holds what the summary reports about
    the data (examples kept after tokenisation, examples cut at ``max_length``).
    """
    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from .llm.embedded import resolve_model

    _check_rows(rows)
    spec = profile.training
    if spec.bf16 and not torch.cuda.is_available():
        raise ModelError(
            f"profile {profile.name!r} trains in bf16, which needs a CUDA GPU and none is "
            f"available; use a CPU profile (bf16: false), e.g. 'smoke'"
        )
    resolved = resolve_model(player_spec.model)
    dtype = torch.bfloat16 if spec.bf16 else torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved, revision=player_spec.revision)
        # Seed before the model exists: SFTTrainer wraps it with LoRA (random A matrices)
        # before the Trainer seeds anything itself.
        transformers.set_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(
            resolved, revision=player_spec.revision, dtype=dtype, attn_implementation=spec.attention
        )
    except OSError as err:
        raise ModelError(f"could not load player model {resolved!r} for training: {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if spec.gradient_checkpointing:
        model.config.use_cache = False

    texts = render_rows(tokenizer, rows, player_spec.enable_thinking)
    # +1: the EOS token TRL appends to every completion.
    lengths = [len(tokenizer(text=t["prompt"] + t["completion"])["input_ids"]) + 1 for t in texts]
    lora = LoraConfig(
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        bias=spec.lora.bias,
        target_modules=list(spec.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    args = SFTConfig(
        output_dir=str(work_dir / "trainer"),
        seed=seed,
        data_seed=seed,
        learning_rate=spec.learning_rate,
        num_train_epochs=spec.epochs,
        max_steps=spec.max_steps,
        per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        warmup_steps=spec.warmup_ratio,  # transformers 5: a float < 1 is a ratio of all steps
        lr_scheduler_type=spec.scheduler,
        lr_scheduler_kwargs={"min_lr_rate": spec.min_lr_rate},
        bf16=spec.bf16,
        **{_checkpointing_field(SFTConfig): spec.gradient_checkpointing},
        dataloader_pin_memory=torch.cuda.is_available(),
        # keep_overlength: no truncation here, where trl 1.x would also drop the rows left with
        # no loss; they are truncated below and kept, as the TRL v1 used did (in its collator).
        max_length=None if spec.keep_overlength else spec.max_length,
        completion_only_loss=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(texts),
        processing_class=tokenizer,
        peft_config=lora,
    )
    if spec.keep_overlength:
        trainer.train_dataset = trainer.train_dataset.map(
            lambda row: {k: row[k][: spec.max_length] for k in ("input_ids", "labels")}
        )
    info = {
        "base_model_resolved": _portable_base_name(player_spec, resolved),
        "dtype": str(dtype).removeprefix("torch."),
        "attention": spec.attention,
        "examples_trained": len(trainer.train_dataset),  # trl drops fully cut-off rows
        "examples_truncated": sum(n > spec.max_length for n in lengths),
        "examples_without_loss": sum(
            all(label == -100 for label in labels) for labels in trainer.train_dataset["labels"]
        ),
    }
    return trainer, info


def train_adapter(
    profile: Profile, player_spec: PlayerSpec, rows: Sequence[dict], out_dir: str | Path, seed: int
) -> dict:
    """Train a LoRA adapter of ``player_spec`` on ``rows`` into ``out_dir``; return its summary.

    ``rows`` are conversational prompt-completion rows (``moloch.trainsets``).
    Writes ``adapter_config.json``, ``adapter_model.safetensors`` and
    ``train_summary.json`` (hash, steps, losses, examples, wall time).
    """
    import peft
    import torch
    import transformers
    import trl

    from .llm.hf import release_warm_backends

    # a warm kernel keeps the models of earlier units (moloch.kernels): training needs the room
    release_warm_backends()
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted run
    tmp.mkdir(parents=True)
    started = time.monotonic()
    try:
        trainer, info = build_trainer(profile, player_spec, rows, tmp, seed)
        result = trainer.train()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # out_dir, if any, is left as it was
        raise

    trainer.model.peft_config["default"].base_model_name_or_path = info["base_model_resolved"]
    # No embedding layer is trained; "auto" would look the base model up on the Hub.
    trainer.model.save_pretrained(str(tmp), save_embedding_layers=False)
    shutil.rmtree(tmp / "trainer", ignore_errors=True)
    missing = [name for name in ADAPTER_FILES if not (tmp / name).is_file()]
    if missing:
        raise ModelError(f"training wrote no {', '.join(missing)} in {tmp}: train again")
    digest, per_file = adapter_sha256(tmp), adapter_files(tmp)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    summary = {
        "adapter_sha256": digest,
        "files": per_file,
        "player": player_spec.name,
        "base_model": player_spec.model,
        "revision": player_spec.revision,
        "profile": profile.name,
        "seed": seed,
        "rows_sha256": object_sha256(list(rows)),
        "examples": len(rows),
        "examples_by_kind": dict(Counter(str(r.get("kind")) for r in rows)),
        **info,
        "steps": trainer.state.global_step,
        "final_loss": losses[-1] if losses else None,
        "mean_loss": result.training_loss,
        "losses": losses,
        "loss": "completion only (prompt tokens masked)",
        "training": profile.training.model_dump(mode="json"),
        "device": str(trainer.args.device),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "peft": peft.__version__,
        },
        "wall_s": round(time.monotonic() - started, 2),
    }
    write_json(tmp / SUMMARY_FILE, summary)
    _install(tmp, out_dir)
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--player", help="player name (default: the profile's first)")
    parser.add_argument("--rows", type=Path, required=True, help="training set, JSON lines")
    parser.add_argument("--out", type=Path, required=True, help="adapter folder to write")
    parser.add_argument("--seed", type=int, help="default: the profile's seed")
    ns = parser.parse_args(argv)
    profile = load_profile(ns.profile)
    player = profile.player(ns.player) if ns.player else profile.players[0]
    seed = profile.seed if ns.seed is None else ns.seed
    summary = train_adapter(profile, player, read_jsonl(ns.rows, "training set"), ns.out, seed)
    print(json.dumps({k: summary[k] for k in ("adapter_sha256", "steps", "final_loss")}))


if __name__ == "__main__":
    main()
