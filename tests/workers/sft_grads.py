"""Compute the SFT loss and gradients on a slice of 8 synthetic pairs; run alone or under torchrun.

    python sft_grads.py DATA_JSONL OUT.pt            # one process, all 8 pairs
    torchrun --nproc_per_node 2 sft_grads.py DATA OUT.pt   # 2 processes, 4 + 4 pairs (gloo, CPU)

Writes (from rank 0) the loss averaged over ranks (what Trainer logs) and every parameter's
gradient after DDP's averaging.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.distributed as dist


def main(data: str, out: str) -> None:
    from ume_retriever import UMEEncoder
    from ume_retriever.model.tiny import build_random_model
    from ume_train.data.pairs import PairCollator, PairDataset, SideTokenizer
    from ume_retriever.inputs.records import read_records
    from ume_train.modeling import UMETrainingModel

    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.use_deterministic_algorithms(True)
    model, processor = build_random_model(seed=0)
    model.train()
    encoder = UMEEncoder(model, processor)
    records = read_records(data).records[:8]
    per_rank = len(records) // world
    mine = records[rank * per_rank:(rank + 1) * per_rank]
    dataset = PairDataset(mine, SideTokenizer(encoder.preparer, max_length=1024))
    batch = PairCollator(encoder.token_ids.pad)([dataset[i] for i in range(len(dataset))])
    wrapper = UMETrainingModel(model)
    if distributed:
        wrapper = torch.nn.parallel.DistributedDataParallel(wrapper)
    terms = wrapper(**batch)
    terms["loss"].backward()
    logged = torch.stack([terms[k].detach() for k in ("loss", "nce_gen", "nce_disc", "ce_query", "ce_target")])
    if distributed:
        dist.all_reduce(logged)
        logged /= world
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    if rank == 0:
        torch.save({"logged": logged, "grads": grads}, out)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
