"""Two training processes (gloo, CPU) against one rollout server: both take part in the weight
sync, process 0 alone sends, and both then sample from the synced weights.

    torchrun --nproc_per_node 2 server_sync.py CKPT SERVER_URL OUT_PREFIX
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.distributed as dist


def main(ckpt: str, url: str, out: str) -> None:
    from ume_retriever import Item, UMEEncoder
    from ume_train.rollouts.client import ServerRollouts
    from ume_train.rollouts import TransformersRollouts

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    encoder = UMEEncoder.from_pretrained(ckpt, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        for p in encoder.model.parameters():
            p.mul_(-1.0)  # the same new weights on both processes
    client = ServerRollouts(url, max_new_tokens=6, connect_timeout=60)
    client.sync_weights(encoder.model)
    prompts = [encoder.preparer.prepare(Item(text=f"a prompt from process {rank}"))]
    served = client.generate(prompts, 2, [rank])
    local = TransformersRollouts(encoder.model, encoder.processor, encoder.token_ids, max_new_tokens=6)
    torch.save({"equal": served == local.generate(prompts, 2, [rank])}, f"{out}.{rank}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
