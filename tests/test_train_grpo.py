"""ume_train GRPO: rewards against hand-computed values, the mechanics of a short run, and the
two-process equivalence of rewards and loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import run_worker


def test_format_reward_hand_values():
    from ume_train.rewards import format_reward

    completions = [
        "<think>a red circle</think><answer> red circle <gen_emb>",
        "preamble <think>multi\nline</think>\n<answer>\nx\n<gen_emb> trailing",
        "<think>no answer</think> <gen_emb>",
        "<answer> x <gen_emb>",
        "<think>x</think><answer> x",
        "",
    ]
    assert format_reward(completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_embedding_reward_hand_computed():
    """2 pairs x G=2 in 2-d, worked out by hand (see the comments)."""
    from ume_train.rewards import embedding_reward

    q = torch.tensor([[1.0, 0], [2.0, 0], [0, 1.0], [0, 3.0]])  # scaling is normalised away
    t = torch.tensor([[1.0, 0], [0.6, 0.8], [0, 1.0], [0.8, 0.6]])
    # q0: sims to t = [1, .6, 0, .8]; top-2 = {t0, t3}: rank 1/2; pos mean .8, neg mean .4 -> .2 (q1..q3 alike)
    # t0: sims to q = [1, 1, 0, 0]: rank 1, gap 1 -> 1; t1: [.6, .6, .8, .8]: top-2 are negatives -> 0
    qr, tr = embedding_reward(q, t, group_size=2)
    torch.testing.assert_close(qr, torch.tensor([0.2, 0.2, 0.2, 0.2]))
    torch.testing.assert_close(tr, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="at least 2 pairs"):
        embedding_reward(q[:2], t[:2], group_size=2)
    with pytest.raises(ValueError, match="groups of 3"):
        embedding_reward(q, t, group_size=3)


def test_embedding_reward_matches_a_loop_reference():
    from ume_train.rewards import embedding_reward

    rng = np.random.default_rng(1)
    n, g, d = 5, 3, 8
    q, t = rng.normal(size=(n * g, d)), rng.normal(size=(n * g, d))

    def reference(a, b):
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
        out = []
        for i in range(len(a)):
            s = b @ a[i]
            pos = set(range((i // g) * g, (i // g) * g + g))
            top = set(np.argsort(-s)[:g].tolist())
            rank = len(top & pos) / g
            gap = np.mean([s[j] for j in pos]) - np.mean([s[j] for j in range(len(b)) if j not in pos])
            out.append(rank * gap)
        return np.array(out)

    qr, tr = embedding_reward(torch.tensor(q), torch.tensor(t), g)
    np.testing.assert_allclose(qr.numpy(), reference(q, t), atol=1e-6)
    np.testing.assert_allclose(tr.numpy(), reference(t, q), atol=1e-6)


def test_group_advantages():
    from ume_train.rewards import group_advantages

    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0])
    a = group_advantages(r, 4)
    first = (r[:4] - r[:4].mean()) / (r[:4].std() + 1e-4)  # sample std (torch default)
    torch.testing.assert_close(a[:4], first)
    torch.testing.assert_close(a[4:], torch.zeros(4))  # equal rewards: no signal
    assert abs(float(a[:4].sum())) < 1e-6


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from ume_train.data.synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("shapes-rl"), train_per_scene=1, seed=0)


def _grpo_args(tmp_path, ckpt, **kw):
    from ume_train.config import GRPOConfig

    base = dict(output_dir=str(tmp_path / "grpo"), model_name_or_path=str(ckpt), use_cpu=True, num_generations=4,
                max_completion_length=12, per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3,
                logging_steps=1, report_to="none", seed=0, save_strategy="no", disable_tqdm=True)
    return GRPOConfig(**{**base, **kw})


def test_short_run_mechanics(tiny_ckpt, shapes, tmp_path):
    """Parameters change, the reference stays frozen, rewards/KL/clip/length are logged,
    advantages are zero-mean per group, an extra reward plugs in, and no <gen_emb> gives 0."""
    from ume_retriever.inputs.records import read_records
    from ume_train.grpo import GRPOTrainer

    seen_columns = {}

    def prefers_short(prompts, completions, **columns):
        seen_columns.update(columns)
        return [None if i == 0 else -len(c) / 100 for i, c in enumerate(completions)]

    records = read_records(shapes.train).records[:4]
    trainer = GRPOTrainer(args=_grpo_args(tmp_path, tiny_ckpt), train_dataset=records, reward_funcs=[prefers_short])
    ref_before = {n: p.detach().clone() for n, p in trainer.reference.named_parameters()}
    before = {n: p.detach().clone() for n, p in trainer.inner_model.named_parameters()}
    advantages = []
    from ume_train import rewards as rewards_module

    original = rewards_module.group_advantages

    def spy(r, g, eps=1e-4):
        a = original(r, g, eps)
        advantages.append(a.view(-1, g))
        return a

    import ume_train.grpo as grpo_module

    grpo_module.group_advantages = spy
    try:
        trainer.train()
    finally:
        grpo_module.group_advantages = original
    logged = [h for h in trainer.state.log_history if "query_reward" in h]
    assert len(logged) == 2
    for key in ("query_reward", "target_reward", "query_reward_format", "query_reward_embedding", "query_kl",
                "target_kl", "query_clip_fraction", "query_completion_length", "format_rate",
                "query_reward_prefers_short"):
        assert key in logged[0] and np.isfinite(logged[0][key]), key
    assert logged[1]["query_kl"] > 0  # the policy moved away from the reference after step 1
    changed = [n for n, p in trainer.inner_model.named_parameters() if not torch.equal(before[n], p)]
    assert any("visual.blocks" in n for n in changed) and any("language_model" in n for n in changed)
    assert all(torch.equal(ref_before[n], p) for n, p in trainer.reference.named_parameters())
    assert not any(p.requires_grad for p in trainer.reference.parameters())
    assert len(advantages) == 4  # 2 steps x 2 sides
    for a in advantages:
        torch.testing.assert_close(a.mean(dim=1), torch.zeros(a.shape[0]), atol=1e-5, rtol=0)
    assert seen_columns["side"] in (["query"] * 8, ["target"] * 8) and len(seen_columns["record"]) == 8
    # a random tiny model never writes <gen_emb> in 12 tokens: embedding rewards are exactly 0
    assert all(h["query_reward_embedding"] == 0 and h["target_reward_embedding"] == 0 for h in logged)


def test_embedding_reward_reaches_rollouts_that_end_in_gen_emb(tiny_ckpt, shapes, tmp_path):
    """Scripted completions (a real generate with a logits processor) that follow the format get
    format reward 1 and the embedding reward computed from the policy's own states."""
    from ume_retriever import UMEEncoder
    from ume_retriever.inputs.records import read_records
    from ume_train.grpo import GRPOTrainer
    from ume_train.rewards import embedding_reward
    from ume_train.rollouts import TransformersRollouts

    records = read_records(shapes.train).records[:2]
    args = _grpo_args(tmp_path, tiny_ckpt, num_generations=2, beta=0.0)
    trainer = GRPOTrainer(args=args, train_dataset=records)
    tok = trainer.processor.tokenizer
    script = tok("<think>x</think><answer> y <gen_emb><|im_end|>", add_special_tokens=False)["input_ids"]
    token_ids = UMEEncoder(trainer.inner_model, trainer.processor).token_ids
    rollouts = TransformersRollouts(trainer.inner_model, trainer.processor, token_ids, max_new_tokens=24,
                                    generation_kwargs={"logits_processor": [ForceScript(script)]})
    trainer.rollouts = rollouts
    loss = trainer.compute_loss(trainer.model, {"records": records})
    assert torch.isfinite(loss)
    assert trainer._metrics["query_reward_format"][-1] == 1.0, trainer._rollout_side(records, "query").texts
    batches = {s: trainer._rollout_side(records, s) for s in ("query", "target")}
    with torch.no_grad():
        out = trainer.model(query=batches["query"], target=batches["target"])
    expected_q, expected_t = embedding_reward(out["query_states"], out["target_states"], 2)
    torch.testing.assert_close(trainer.last_rewards["query"], 1.0 + expected_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trainer.last_rewards["target"], 1.0 + expected_t, atol=1e-5, rtol=1e-5)


class ForceScript:
    """A logits processor that makes every row write ``script`` (each generate call anew)."""

    def __init__(self, script: list[int]):
        self.script, self.start, self.last = script, 0, -2

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        length = input_ids.shape[1]
        if length != self.last + 1:  # a new generate call
            self.start = length
        self.last = length
        step = min(length - self.start, len(self.script) - 1)
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.script[step]] = 0.0
        return forced


@pytest.mark.slow
def test_two_processes_equal_one_process(tiny_ckpt, shapes, tmp_path):
    """2 + 2 records on two ranks == 4 on one (rewards, loss, gradients; 1e-5). Both sides run
    through the same worker with the same thread count."""
    run_worker("grpo_step.py", tiny_ckpt, shapes.train, tmp_path / "one.pt", cwd=tmp_path)
    run_worker("grpo_step.py", tiny_ckpt, shapes.train, tmp_path / "two.pt", nproc=2, cwd=tmp_path)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    torch.testing.assert_close(two["rewards"], one["rewards"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(two["loss"], one["loss"], atol=1e-5, rtol=1e-5)
    for name, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("name", ["grpo_2b_zero3.yaml", "grpo_7b_zero3.yaml", "grpo_2b_vllm.yaml", "grpo_tiny_cpu.yaml"])
def test_shipped_grpo_configs_dry_run(name, tiny_ckpt, shapes, monkeypatch, capsys):
    """The GRPO recipes parse, validate and pass the dry run; the plan names who samples rollouts."""
    import importlib.util

    from helpers import recipe_dry_run
    from ume_retriever.inputs.records import read_records

    plan = recipe_dry_run("grpo", name, tiny_ckpt, shapes, monkeypatch, capsys)
    assert plan["records"] == str(len(read_records(shapes.train, require_reasoning=False).records))
    if name == "grpo_2b_vllm.yaml":
        installed = importlib.util.find_spec("vllm") is not None
        assert plan["rollouts"] == f"vllm, colocated ({'installed' if installed else 'NOT installed here: pip install ume-r1[vllm]'})"
    else:
        assert plan["rollouts"] == "transformers generate on the policy"


def test_grpo_run_skips_a_prompt_that_fails_to_prepare_and_reports_it(tiny_ckpt, shapes, tmp_path, caplog):
    """A target PDF page past the end (it reads; it fails when its prompt is prepared): the two
    steps run on full batches, the record is logged with file:line and counted."""
    import json

    import pymupdf
    from transformers import TrainerCallback

    from ume_train.grpo import GRPOTrainer

    doc = pymupdf.open()
    doc.new_page(width=100, height=100).insert_text((10, 50), "one page")
    doc.save(tmp_path / "one.pdf")
    rows = [json.loads(line) for line in shapes.train.read_text().splitlines()[:3]]
    for row in rows:
        row["target"]["image"] = str(shapes.root / row["target"]["image"])
    rows.insert(1, {**rows[0], "target": {"pdf": str(tmp_path / "one.pdf"), "page": 2}})
    path = tmp_path / "rl.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    class BatchSizes(TrainerCallback):
        def __init__(self):
            self.sizes = []

        def on_step_end(self, args, state, control, **kwargs):
            self.sizes.append(len(trainer.last_rewards["query"]))

    sizes = BatchSizes()
    trainer = GRPOTrainer(args=_grpo_args(tmp_path, tiny_ckpt, train_files=[str(path)], max_bad_records=1, beta=0.0),
                          callbacks=[sizes])
    trainer.train()
    assert sizes.sizes == [2 * 4, 2 * 4]  # 2 prompts x G=4 rollouts, both steps
    where = f"{path}:2"
    assert list(trainer.bad_records) == [where]
    assert "page 2 of" in trainer.bad_records[where] and "does not exist (1 pages)" in trainer.bad_records[where]
    assert any(f"skipping bad record {where}" in r.message for r in caplog.records)
