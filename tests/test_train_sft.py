"""ume_train SFT: the loss against independent computations, distributed equivalence, the
checkpoint round trip, resume after kill -9, and the CLI's dry run."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch

from helpers import recipe_dry_run, run_worker


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from ume_train.data.synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("shapes"), train_per_scene=1, seed=0)


@pytest.fixture(scope="module")
def model_and_processor():
    from ume_retriever.model.tiny import build_random_model

    return build_random_model(seed=0)


def _numpy_info_nce(q: np.ndarray, t: np.ndarray, scale: float) -> float:
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    logits = scale * q @ t.T

    def ce(m):
        m = m - m.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(m).sum(axis=1)) - np.diag(m)))

    return (ce(logits) + ce(logits.T)) / 2


def test_symmetric_info_nce_matches_numpy():
    from ume_train.losses import symmetric_info_nce

    rng = np.random.default_rng(0)
    q, t = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    got = symmetric_info_nce(torch.tensor(q), torch.tensor(t))
    assert float(got) == pytest.approx(_numpy_info_nce(q, t, 50.0), rel=1e-5)
    # it normalises the rows itself: scaling a row changes nothing
    scaled = symmetric_info_nce(torch.tensor(q * np.arange(1, 7)[:, None]), torch.tensor(t), scale=10.0)
    assert float(scaled) == pytest.approx(_numpy_info_nce(q, t, 10.0), rel=1e-5)
    # matching pairs give a lower loss than shuffled ones
    assert float(symmetric_info_nce(torch.tensor(q), torch.tensor(q + 0.01 * t))) < float(got)
    with pytest.raises(ValueError, match="two \\(N, d\\) tensors"):
        symmetric_info_nce(torch.zeros(3, 4), torch.zeros(2, 4))


def test_training_forward_matches_plain_model(model_and_processor, shapes):
    """disc/gen vectors and the answer CE equal what a plain full forward pass gives."""
    from ume_retriever import UMEEncoder
    from ume_train.data.pairs import PairCollator, PairDataset, SideTokenizer
    from ume_retriever.inputs.records import read_records
    from ume_train.modeling import side_forward

    model, processor = model_and_processor
    encoder = UMEEncoder(model, processor)
    records = read_records(shapes.train).records[:3]
    dataset = PairDataset(records, SideTokenizer(encoder.preparer, max_length=1024))
    pairs = [dataset[i] for i in range(3)]
    batch = PairCollator(encoder.token_ids.pad)(pairs)["target"]
    with torch.no_grad():
        out = side_forward(model, batch)
        ce_sum = 0.0
        tokens = 0
        for row, pair in enumerate(pairs):  # one unpadded sequence at a time, HF's own forward
            side = pair["target"]
            p = side.prepared
            inputs = {"input_ids": p.input_ids[None], "attention_mask": torch.ones_like(p.input_ids)[None],
                      "mm_token_type_ids": p.mm_token_type_ids[None], **p.vision}
            full = model(**inputs, output_hidden_states=True)
            last = full.hidden_states[-1][0]
            torch.testing.assert_close(out.disc[row], last[p.disc_position], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.gen[row], last[side.gen_index], atol=1e-5, rtol=1e-5)
            # the answer's first <gen_emb>, not the one inside the generation prompt
            assert p.input_ids[side.gen_index] == encoder.token_ids.gen and side.gen_index > side.answer_start
            labels = side.labels()
            n = int((labels[1:] != -100).sum())
            hf = model(**inputs, labels=labels[None]).loss  # mean over answer tokens
            ce_sum += float(hf) * n
            tokens += n
            # the prompt, including "<|im_start|>assistant\n", is masked; the answer ends with <|im_end|>
            assert (labels[: side.answer_start] == -100).all()
            assert processor.tokenizer.decode(labels[-1:]) == "<|im_end|>"
    assert int(out.ce_tokens) == tokens
    assert float(out.ce_sum) == pytest.approx(ce_sum, rel=1e-4)


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_global_batch(shapes, tmp_path):
    """gloo, CPU, torchrun: 4 + 4 pairs on two ranks == 8 pairs on one (loss and gradients, 1e-5).
    Both sides run through the same worker with the same thread count."""
    run_worker("sft_grads.py", shapes.train, tmp_path / "one.pt", cwd=tmp_path)
    run_worker("sft_grads.py", shapes.train, tmp_path / "two.pt", nproc=2, cwd=tmp_path)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    torch.testing.assert_close(two["logged"], one["logged"], atol=1e-5, rtol=1e-5)
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 10
    for name, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, atol=1e-5, rtol=1e-5, msg=name)


def _config(tmp_path, ckpt, train_files, **kw):
    from ume_train import SFTConfig

    base = dict(output_dir=str(tmp_path / "out"), model_name_or_path=str(ckpt), train_files=[str(f) for f in train_files],
                per_device_train_batch_size=4, max_steps=3, learning_rate=1e-3, use_cpu=True, save_strategy="no",
                logging_steps=1, report_to="none", freeze_vision_tower=False, disable_tqdm=True, seed=0)
    return SFTConfig(**{**base, **kw})


def test_train_three_steps_save_and_load_gives_the_same_vectors(tiny_ckpt, shapes, tmp_path):
    from ume_retriever import UMEEncoder
    from ume_train import SFTTrainer

    trainer = SFTTrainer(args=_config(tmp_path, tiny_ckpt, [shapes.train]))
    before = {n: p.detach().clone() for n, p in trainer.inner_model.named_parameters()}
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3
    for key in ("nce_gen", "nce_disc", "ce_query", "ce_target"):
        assert all(np.isfinite(h[key]) and h[key] > 0 for h in logged), key
    changed = [n for n, p in trainer.inner_model.named_parameters() if not torch.equal(before[n], p)]
    assert any("visual.blocks" in n for n in changed) and any("language_model" in n for n in changed)
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    loaded = UMEEncoder.from_pretrained(out, device="cpu", dtype=torch.float32, max_new_tokens=10)
    trainer.inner_model.eval()
    live = UMEEncoder(trainer.inner_model, trainer.processor, max_new_tokens=10)
    items = [shapes_item for shapes_item in (r.target.to_item() for r in trainer.train_dataset.records[:2])]
    items += ["a red circle in the top left"]
    a, b = live.encode(items, mode="both"), loaded.encode(items, mode="both")
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.disc, y.disc, atol=1e-5)
        np.testing.assert_allclose(x.gen, y.gen, atol=1e-5)
        assert x.reasoning == y.reasoning


def test_vision_tower_frozen_by_default(tiny_ckpt, shapes, tmp_path):
    from ume_train import SFTTrainer

    trainer = SFTTrainer(args=_config(tmp_path, tiny_ckpt, [shapes.train], freeze_vision_tower=True, max_steps=1))
    trainable = {n for n, p in trainer.inner_model.named_parameters() if p.requires_grad}
    assert not any("visual.blocks" in n or "patch_embed" in n for n in trainable)
    assert any("visual.merger" in n for n in trainable) and any("language_model" in n for n in trainable)


@pytest.mark.parametrize("vision_lr", [0.0, 4e-3])
def test_vision_lr_moves_the_vision_module_at_its_own_rate(tiny_ckpt, shapes, tmp_path, vision_lr):
    """AdamW's first step moves every weight with a gradient by the rate itself (m / sqrt(v) is
    the gradient's sign), so the median move per module is its learning rate."""
    from ume_train import SFTTrainer

    trainer = SFTTrainer(args=_config(tmp_path, tiny_ckpt, [shapes.train], max_steps=1, learning_rate=1e-3,
                                      vision_lr=vision_lr, lr_scheduler_type="constant", warmup_steps=0))
    before = {n: p.detach().clone() for n, p in trainer.inner_model.named_parameters()}
    trainer.train()
    moves = {"vision": [], "llm": []}
    for n, p in trainer.inner_model.named_parameters():
        delta = (p.detach() - before[n]).abs().flatten()
        moves["vision" if ".visual." in f".{n}" else "llm"].append(delta)
    vision, llm = torch.cat(moves["vision"]), torch.cat(moves["llm"])
    if vision_lr == 0:
        assert float(vision.max()) == 0.0
    else:
        assert float(vision[vision > 0].median()) == pytest.approx(vision_lr, rel=1e-2)
    assert float(llm[llm > 0].median()) == pytest.approx(1e-3, rel=1e-2)


def test_lora_trains_adapters_and_saves_merged_weights(tiny_ckpt, shapes, tmp_path):
    from ume_retriever import UMEEncoder
    from ume_train import SFTTrainer

    trainer = SFTTrainer(args=_config(tmp_path, tiny_ckpt, [shapes.train], use_lora=True, lora_r=4, max_steps=2,
                                      freeze_vision_tower=True))
    trainable = [n for n, p in trainer.inner_model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable)
    assert not any("language_model" in n and "lora" not in n for n in trainable)
    trainer.train()
    trainer.save_model(str(tmp_path / "lora"))
    loaded = UMEEncoder.from_pretrained(tmp_path / "lora", device="cpu", dtype=torch.float32)
    trainer.inner_model.eval()
    live = trainer.encoder  # the live model with its adapters, as the trainer evaluates it
    np.testing.assert_allclose(live.encode(["a blue square"], mode="disc")[0].disc,
                               loaded.encode(["a blue square"], mode="disc")[0].disc, atol=1e-5)


def _resume_config(tmp_path, tiny_ckpt, shapes):
    config = tmp_path / "run.yaml"
    config.write_text("\n".join([
        f"model_name_or_path: {tiny_ckpt}", f"train_files: [{shapes.train}]", "per_device_train_batch_size: 4",
        "max_steps: 4", "save_steps: 2", "learning_rate: 0.001", "use_cpu: true", "logging_steps: 1",
        "freeze_vision_tower: false", "seed: 0", "disable_tqdm: true", "report_to: none",
    ]))
    return config


def _steps_run(proc) -> list[int]:
    return [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("step ")]


def _assert_same_weights(a_dir, b_dir) -> None:
    from safetensors.torch import load_file

    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.slow
def test_resume_after_kill_continues_the_same_run(tiny_ckpt, shapes, tmp_path):
    """A run killed (SIGKILL) right after its step-2 checkpoint, resumed, ends where an
    uninterrupted run ends (all three runs: the same worker, the same thread count)."""
    config = _resume_config(tmp_path, tiny_ckpt, shapes)

    def run(out: str, *extra: str):
        return run_worker("sft_kill.py", config, "--output_dir", tmp_path / out, *extra, check=False)

    whole = run("whole")  # uninterrupted
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = run("killed", "--kill_at_step", "2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (tmp_path / "killed" / "checkpoint-2").is_dir() and not (tmp_path / "killed" / "checkpoint-4").exists()
    resumed = run("killed", "--resume_from_checkpoint", "true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps_run = {"whole": _steps_run(whole), "killed": _steps_run(killed), "resumed": _steps_run(resumed)}
    assert steps_run == {"whole": [1, 2, 3, 4], "killed": [1, 2], "resumed": [3, 4]}  # resumed, not restarted
    _assert_same_weights(tmp_path / "whole", tmp_path / "killed")
    state = json.loads((tmp_path / "killed" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_save_resumes_from_the_last_complete_checkpoint(tiny_ckpt, shapes, tmp_path):
    """kill -9 inside the step-4 save (weights written, trainer state not): resuming skips the
    partial checkpoint-4, logs it, resumes from checkpoint-2 and ends equal (1e-6, every tensor)
    to an uninterrupted run. All runs: the same worker, the same thread count."""
    from ume_train.checkpoint import COMPLETE_MARKER

    config = _resume_config(tmp_path, tiny_ckpt, shapes)

    def run(out: str, *extra: str):
        return run_worker("sft_kill.py", config, "--output_dir", tmp_path / out, *extra, check=False)

    whole = run("whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = run("killed", "--kill_in_save_at_step", "4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    partial, previous = tmp_path / "killed" / "checkpoint-4", tmp_path / "killed" / "checkpoint-2"
    # what the kill left: weights of step 4 but no trainer state, no marker; step 2 complete
    assert (partial / "model.safetensors").is_file() and not (partial / "trainer_state.json").exists()
    assert not (partial / COMPLETE_MARKER).exists() and (previous / COMPLETE_MARKER).is_file()
    marker = json.loads((previous / COMPLETE_MARKER).read_text())
    assert marker["global_step"] == 2
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= set(marker["files"])
    assert marker["files"]["model.safetensors"] == (previous / "model.safetensors").stat().st_size
    resumed = run("killed", "--resume_from_checkpoint", "true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"not resuming from {partial}: no {COMPLETE_MARKER}" in resumed.stderr
    assert f"resuming from {previous} (skipped 1 incomplete newer checkpoint(s))" in resumed.stderr
    assert (_steps_run(whole), _steps_run(killed), _steps_run(resumed)) == ([1, 2, 3, 4], [1, 2, 3, 4], [3, 4])
    _assert_same_weights(tmp_path / "whole", tmp_path / "killed")
    _assert_same_weights(tmp_path / "whole" / "checkpoint-4", partial)  # rewritten whole, and marked
    assert json.loads((partial / COMPLETE_MARKER).read_text())["global_step"] == 4
    assert json.loads((partial / "trainer_state.json").read_text())["global_step"] == 4


def test_resume_from_checkpoint_picks_the_last_complete_one(tmp_path):
    """resolve_resume on folders made by hand: True/"true"/"auto" skip unmarked and damaged
    checkpoints; "auto" starts afresh when none is complete; True then names what it found."""
    from ume_train.checkpoint import mark_complete, resolve_resume

    assert resolve_resume("auto", tmp_path / "nothing-yet") is None
    with pytest.raises(ValueError, match="holds no complete checkpoint"):
        resolve_resume(True, tmp_path)
    for step in (2, 4, 6, 10):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * step)
        (folder / "trainer_state.json").write_text("{}")
        if step != 10:
            mark_complete(folder, step)
    (tmp_path / "checkpoint-6" / "model.safetensors").write_bytes(b"x")  # cut short after marking
    for value in (True, "true", "True", "auto"):
        assert resolve_resume(value, tmp_path) == str(tmp_path / "checkpoint-4")  # 10 unmarked, 6 damaged
    assert resolve_resume(None, tmp_path) is None and resolve_resume("false", tmp_path) is None
    (tmp_path / "checkpoint-10" / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match="checkpoint-10.*not a complete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoint-10"), tmp_path)
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no complete checkpoint .*checkpoint-10: no ume_checkpoint_complete.json"):
        resolve_resume("true", tmp_path)
    assert resolve_resume("auto", tmp_path) is None


def test_config_validation():
    from ume_train import SFTConfig

    with pytest.raises(ValueError, match="data_format"):
        SFTConfig(output_dir="x", data_format="csv", use_cpu=True)
    with pytest.raises(ValueError, match="gen_nce_weight"):
        SFTConfig(output_dir="x", gen_nce_weight=-1, use_cpu=True)
    with pytest.raises(ValueError, match="remove_unused_columns"):
        SFTConfig(output_dir="x", remove_unused_columns=True, use_cpu=True)
    c = SFTConfig(output_dir="x", use_cpu=True)
    assert (c.learning_rate, c.lr_scheduler_type, c.logit_scale, c.freeze_vision_tower) == (5e-5, "cosine", 50.0, True)


@pytest.mark.parametrize("name", ["sft_2b_zero3.yaml", "sft_7b_zero3.yaml", "sft_2b_fsdp.yaml", "sft_tiny_cpu.yaml"])
def test_shipped_configs_dry_run(name, tiny_ckpt, shapes, monkeypatch, capsys):
    """The example recipes parse, validate, and pass the dry run (data and launcher files read)."""
    plan = recipe_dry_run("sft", name, tiny_ckpt, shapes, monkeypatch, capsys)
    assert plan["records"] == "96" and plan["bad_records_skipped"] == "0"


def test_cli_reports_bad_records_in_one_line(tmp_path, capsys):
    from ume_train.cli import main

    data = tmp_path / "bad.jsonl"
    data.write_text('{"query": {"text": "q", "reasoning": "<think>x</think><answer> x"}, '
                    '"target": {"image": "missing.png", "reasoning": "<think>y</think><answer> y"}}\n')
    code = main(["sft", "--dry-run", "--output_dir", str(tmp_path / "o"), "--train_files", str(data), "--use_cpu", "true"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") <= 3
    assert f"{data}:1" in err and "media file not found" in err


def _data_with_a_corrupt_image(tmp_path, shapes, good: int = 7, bad_line: int = 4):
    """``good`` synthetic pairs with, on line ``bad_line``, one whose target image exists but is
    cut in half (it reads, it does not decode)."""
    from PIL import Image

    from ume_retriever.inputs.records import read_records

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    rows = [json.loads(line) for line in shapes.train.read_text().splitlines()[:good]]
    for row in rows:  # absolute media paths: the file lives elsewhere
        row["target"]["image"] = str(shapes.root / row["target"]["image"])
    bad = {**rows[0], "target": {**rows[0]["target"], "image": str(tmp_path / "cut.png")}}
    rows.insert(bad_line - 1, bad)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(read_records(path).records) == good + 1  # reading alone finds nothing wrong
    return path, f"{path}:{bad_line}"


def test_sft_run_skips_a_record_that_fails_to_prepare_and_reports_it(tiny_ckpt, shapes, tmp_path, caplog, capsys):
    """A corrupt image found only when its pair is tokenised: the run finishes, the record is
    replaced in its batch (every batch keeps its size), logged with file:line, counted against
    max_bad_records and reported in the run's summary; the dry run prepares records exactly as
    the trainer does."""
    from ume_retriever.inputs.records import read_records
    from ume_train import SFTTrainer
    from ume_train.checkpoint import load_training_processor, training_preparer
    from ume_train.cli import main

    path, where = _data_with_a_corrupt_image(tmp_path, shapes)
    trainer = SFTTrainer(args=_config(tmp_path, tiny_ckpt, [path], max_bad_records=1, max_steps=3))
    sizes, skipped = [], []
    for batch in trainer.get_train_dataloader():  # one epoch: 8 pairs, 2 batches of 4
        sizes.append((batch["query"]["input_ids"].shape[0], batch["target"]["input_ids"].shape[0]))
        skipped += batch["skipped"]
    assert sizes == [(4, 4), (4, 4)]
    assert [w for w, _ in skipped] == [where] and "truncated or corrupt image data" in skipped[0][1]
    trainer.train()
    assert len([h for h in trainer.state.log_history if "loss" in h]) == 3
    assert list(trainer.bad_records) == [where]
    assert any(f"skipping bad record {where}" in r.message and "1 of max_bad_records=1" in r.message
               for r in caplog.records)
    # the dry run's preparer (processor and config files only) prepares as the trainer's encoder does
    processor = load_training_processor(str(tiny_ckpt))
    preparer = training_preparer(str(tiny_ckpt), processor, max_new_tokens=128, num_video_frames=8)
    item = read_records(path).records[0].target.to_item()
    a, b = preparer.prepare(item), trainer.encoder.preparer.prepare(item)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.vision["pixel_values"], b.vision["pixel_values"])
    # the command's summary reports the skip
    code = main(["sft", "--output_dir", str(tmp_path / "cli"), "--model_name_or_path", str(tiny_ckpt), "--train_files",
                 str(path), "--max_bad_records", "1", "--max_steps", "2", "--per_device_train_batch_size", "4",
                 "--use_cpu", "true", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"])
    out = capsys.readouterr()
    assert code == 0, out.err
    summary = dict(line.split(None, 1) for line in out.out.strip().splitlines())
    assert summary["steps"] == "2" and summary["bad_records_skipped"] == "1"


def test_a_run_stops_listing_the_bad_records_beyond_max_bad_records(tiny_ckpt, shapes, tmp_path):
    from ume_retriever.inputs.records import TooManyBadRecords
    from ume_train import SFTTrainer

    path, where = _data_with_a_corrupt_image(tmp_path, shapes)
    trainer = SFTTrainer(args=_config(tmp_path, tiny_ckpt, [path], max_bad_records=0, max_steps=3))
    with pytest.raises(TooManyBadRecords) as err:
        trainer.train()
    message = str(err.value)
    assert "1 bad training records (max_bad_records=0 allows 0)" in message
    assert f"{where}: target: " in message and "truncated or corrupt image data" in message
