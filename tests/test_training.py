"""LoRA training with the real embedded model: prompt masked, adapter complete, hash stable."""

import json

import pytest

from moloch.config import load_profile
from moloch.errors import DataError, ModelError


def tiny_rows(n: int = 4) -> list[dict]:
    return [
        {
            "prompt": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": f"Write a one-line pitch for gadget {i}."},
            ],
            "completion": [
                {"role": "assistant", "content": f"<think> short </think> Gadget {i} rocks!"}
            ],
            "kind": "rft",
            "anchor_id": f"sales/train/{i:04d}",
        }
        for i in range(n)
    ]


def quick_profile(**training):
    smoke = load_profile("smoke")
    # No warm-up: with 2 steps the first would otherwise run at learning rate 0.
    changes = {"max_steps": 2, "batch_size": 2, "warmup_ratio": 0.0, **training}
    return smoke.model_copy(update={"training": smoke.training.model_copy(update=changes)})


@pytest.fixture(scope="module")
def checkpoint():
    from moloch.llm.embedded import embedded_checkpoint

    try:
        return embedded_checkpoint()
    except ModelError as err:
        pytest.skip(f"embedded model unavailable: {err}")


@pytest.mark.integration
def test_loss_is_on_the_completion_only(checkpoint, tmp_path):
    from moloch.training import build_trainer

    profile = quick_profile()
    rows = tiny_rows(2)
    trainer, info = build_trainer(profile, profile.players[0], rows, tmp_path, seed=1)
    tok = trainer.processing_class
    assert info["examples_trained"] == 2 and info["examples_truncated"] == 0
    for row, example in zip(rows, trainer.train_dataset, strict=True):
        ids, labels = example["input_ids"], example["labels"]
        target = tok(text=row["completion"][0]["content"])["input_ids"] + [tok.eos_token_id]
        trained = [i for i, label in zip(ids, labels, strict=True) if label != -100]
        assert trained == target  # completion + EOS, nothing of the prompt
        prompt = tok.decode(ids[: len(ids) - len(target)])
        assert prompt.endswith("<|im_start|>assistant\n") and "gadget" in prompt


@pytest.mark.integration
def test_adapter_is_complete_and_its_hash_reproducible(checkpoint, tmp_path):
    from moloch.training import SUMMARY_FILE, load_train_summary, train_adapter

    profile = quick_profile()
    player = profile.players[0]
    one = train_adapter(profile, player, tiny_rows(), tmp_path / "one", seed=5)
    # The paper's gradient checkpointing only trades memory for compute: same adapter.
    checkpointed = quick_profile(gradient_checkpointing=True)
    two = train_adapter(checkpointed, player, tiny_rows(), tmp_path / "two", seed=5)

    folder = tmp_path / "one"
    assert {"adapter_config.json", "adapter_model.safetensors", SUMMARY_FILE} <= {
        p.name for p in folder.iterdir()
    }
    assert not (tmp_path / "one.tmp").exists()
    assert one["adapter_sha256"] == two["adapter_sha256"]
    assert one["losses"] == two["losses"] and len(one["losses"]) == one["steps"] == 2
    assert one["examples"] == 4 and one["seed"] == 5 and one["dtype"] == "float32"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 32
    assert set(config["target_modules"]) == set(profile.training.lora.target_modules)
    assert str(checkpoint.parent) not in config["base_model_name_or_path"]  # portable
    assert load_train_summary(folder) == one

    (folder / "adapter_model.safetensors").write_bytes(b"damaged")
    assert load_train_summary(folder) is None


def test_empty_or_malformed_rows_are_refused(tmp_path, monkeypatch):
    from moloch.llm import hf
    from moloch.training import train_adapter

    profile = quick_profile()
    monkeypatch.setattr(hf, "_WARM", type(hf._WARM)(kept=object()))
    with pytest.raises(DataError, match="training set is empty"):
        train_adapter(profile, profile.players[0], [], tmp_path / "a", seed=1)
    assert not hf._WARM  # a warm kernel's models are let go before training: it needs the room
    bad = [{"prompt": "text", "completion": "text", "anchor_id": "sales/train/0007"}]
    with pytest.raises(DataError, match="row 0 \\(anchor sales/train/0007\\)"):
        train_adapter(profile, profile.players[0], bad, tmp_path / "a", seed=1)
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.tmp").exists()


@pytest.mark.integration
@pytest.mark.gpu
def test_paper_settings_train_on_a_gpu(checkpoint, tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from moloch.training import train_adapter

    profile = quick_profile(bf16=True, gradient_checkpointing=True, max_steps=1)
    summary = train_adapter(profile, profile.players[0], tiny_rows(), tmp_path / "gpu", seed=2)
    assert summary["steps"] == 1 and summary["dtype"] == "bfloat16"
    assert summary["training"]["gradient_checkpointing"] is True
    assert summary["device"].startswith("cuda")


def test_an_interrupted_training_leaves_the_old_adapter_alone(tmp_path, monkeypatch):
    from moloch import training

    out = tmp_path / "adapter"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"previous adapter")

    def crash(*args, **kwargs):
        (tmp_path / "adapter.tmp" / "half").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "build_trainer", crash)
    profile = quick_profile()
    with pytest.raises(KeyboardInterrupt):
        training.train_adapter(profile, profile.players[0], tiny_rows(), out, seed=1)
    assert (out / "adapter_model.safetensors").read_bytes() == b"previous adapter"
    assert not (tmp_path / "adapter.tmp").exists()


@pytest.mark.integration
@pytest.mark.parametrize("keep", [True, False])
def test_rows_past_max_length_are_kept_faithfully_and_dropped_when_corrected(
    checkpoint, tmp_path, keep
):
    """v1's TRL kept a row whose completion lies wholly past max_length (no loss, but a batch
    slot and a step); trl 1.x drops it. Four short rows and two whose prompt fills the window."""
    from moloch.training import build_trainer

    profile = quick_profile(max_steps=-1, max_length=48, keep_overlength=keep)
    long = tiny_rows(2)
    for row in long:
        row["prompt"][1]["content"] = "Describe every gadget there is. " * 20
    rows = tiny_rows(4) + long
    trainer, info = build_trainer(profile, profile.players[0], rows, tmp_path, seed=1)
    assert info["examples_truncated"] == 2
    steps = len(trainer.get_train_dataloader())  # batch 2, one epoch
    if keep:
        assert info["examples_trained"] == 6 and info["examples_without_loss"] == 2
        assert steps == 3 and all(len(ids) <= 48 for ids in trainer.train_dataset["input_ids"])
    else:
        assert info["examples_trained"] == 4 and info["examples_without_loss"] == 0
        assert steps == 2
