"""One GRPO loss computation (rollouts, rewards, advantages, loss, backward) on 4 synthetic
pairs: alone, or 2 + 2 under torchrun (gloo, CPU). Rank 0 writes the rewards of the whole
global batch, the loss averaged over ranks (what Trainer logs) and the gradients after DDP.

    python grpo_step.py CKPT DATA OUT.pt
    torchrun --nproc_per_node 2 grpo_step.py CKPT DATA OUT.pt
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.distributed as dist


def main(ckpt: str, data: str, out: str) -> None:
    from ume_train.config import GRPOConfig
    from ume_retriever.inputs.records import read_records
    from ume_train.grpo import GRPOTrainer

    args = GRPOConfig(output_dir=os.path.join(os.path.dirname(out), "grpo-out"), model_name_or_path=ckpt,
                      use_cpu=True, num_generations=4, max_completion_length=12, per_device_train_batch_size=2,
                      beta=0.04, report_to="none", seed=0, learning_rate=1e-3)
    world = args.world_size  # initialises the process group under torchrun
    rank = args.process_index
    torch.use_deterministic_algorithms(True)
    records = read_records(data, require_reasoning=False).records[:4]
    mine = records[rank * (4 // world):(rank + 1) * (4 // world)]
    trainer = GRPOTrainer(args=args, train_dataset=records)
    policy = trainer.model
    if world > 1:
        policy = torch.nn.parallel.DistributedDataParallel(policy)
    loss = trainer.compute_loss(policy, {"records": mine})
    loss.backward()
    rewards = torch.cat([trainer.last_rewards["query"], trainer.last_rewards["target"]])
    logged = loss.detach().clone()
    if world > 1:
        parts = [torch.empty_like(rewards) for _ in range(world)]
        dist.all_gather(parts, rewards)
        # rank-major: [q ranks..., t ranks...] -> regroup as the single process orders them
        half = rewards.shape[0] // 2
        rewards = torch.cat([p[:half] for p in parts] + [p[half:] for p in parts])
        dist.all_reduce(logged)
        logged /= world
    grads = {n: p.grad.detach().clone() for n, p in trainer.inner_model.named_parameters() if p.grad is not None}
    if rank == 0:
        torch.save({"rewards": rewards, "loss": logged, "grads": grads}, out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
