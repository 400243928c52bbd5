"""Encoder overheads, measured side by side in one run (ratios, not absolute times).

    python benchmarks/encoder_overhead.py                 # CPU, a small random model
    python benchmarks/encoder_overhead.py --preset 2b     # GPU: 2B-shaped random weights, bf16, SDPA

Prints, for the same inputs and batches:
- disc: encode(mode="disc") / bare model(**inputs)            (target <= 1.05)
- gen:  encode(mode="gen") / bare model.generate, same tokens (target <= 1.10)
- gen peak memory: encode / bare generate, and the reference's output_hidden_states generate
  / bare generate (the reference keeps every layer's state at every step)
"Bare" is timed twice: with the processor call inside the timed region (what a user writing
it by hand runs) and with inputs prepared beforehand (the model call alone).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ume_retriever import Item, UMEEncoder  # noqa: E402
from ume_retriever.model.prompt import build_messages  # noqa: E402
from ume_retriever.model.tiny import TinyModelSpec, build_random_model, qwen2vl_2b_spec  # noqa: E402


def make_inputs(n: int, page_size: int) -> list[Item]:
    """Half text queries, half page-like images (varied lengths so batches need padding)."""
    items = []
    for i in range(n):
        if i % 2:
            img = Image.new("RGB", (page_size, int(page_size * 1.3)), (255, 255, 255))
            for y in range(0, img.size[1], 24):  # stripes so the image is not uniform
                img.paste((20 * (i % 10), 40, 200), (10, y, img.size[0] - 10, y + 6))
            items.append(Item(image=img, text=f"page {i}"))
        else:
            items.append(Item(text="query about a document " + "with more words " * (i % 7)))
    return items


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


class PeakMemory:
    """Peak extra memory in use during a block.

    CUDA: the caching allocator's peak. CPU: glibc's bytes in use (``mallinfo2``: heap chunks
    in use + mmapped chunks; torch's CPU tensors live there), sampled by a thread. Unlike RSS
    it does not count memory freed but kept by the allocator.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        if device.type != "cuda":
            self._libc = ctypes.CDLL("libc.so.6")
            self._libc.mallinfo2.restype = _MallInfo2

    def _in_use(self) -> int:
        info = self._libc.mallinfo2()
        return info.uordblks + info.hblkhd

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self._in_use()
            self._stop = False
            self._max = self.start

            def sample() -> None:
                while not self._stop:
                    self._max = max(self._max, self._in_use())
                    time.sleep(0.0002)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self._stop = True
            self._thread.join()
            self.peak = self._max - self.start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["small", "2b"], default="small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=16, help="inputs")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--page-size", type=int, default=224, help="page width in pixels")
    ap.add_argument("--out", default="benchmarks/results/encoder_overhead.json")
    args = ap.parse_args()

    device = torch.device(args.device)
    if args.preset == "2b":
        spec, dtype = qwen2vl_2b_spec(), torch.bfloat16
    else:
        spec = TinyModelSpec(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
                             num_key_value_heads=4, vision_depth=2, vision_embed_dim=128, vision_num_heads=4,
                             max_pixels=224 * 224)
        dtype = torch.float32
    model, processor = build_random_model(0, spec, device=device, dtype=dtype)
    processor.tokenizer.padding_side = "left"
    if args.preset == "2b":
        model.config._attn_implementation = "sdpa"
    enc = UMEEncoder(model, processor, name_or_path=f"random-{args.preset}", batch_size=args.batch_size,
                     max_new_tokens=args.new_tokens)
    items = make_inputs(args.n, args.page_size)
    # The same batches encode() forms: longest first.
    prepared = [enc.prepare(it) for it in items]
    order = sorted(range(len(items)), key=lambda i: -len(prepared[i]))
    batches = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    visual_tokens = [int(p.vision["image_grid_thw"].prod() // 4) for p in prepared if "image_grid_thw" in p.vision]

    def processed(batch: list[int]) -> dict:
        msgs = [build_messages(items[i].text or "", num_images=1) for i in batch]
        texts = [processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs]
        images = [items[i].image if items[i].image is not None else Image.new("RGB", (28, 28), "white") for i in batch]
        return processor(text=texts, images=images, padding=True, return_tensors="pt").to(device)

    pre = [processed(b) for b in batches]
    gen_cfg = enc.backend._generation_config(enc._sampling("gen", 1, None, 1.0, 1.0, None, args.new_tokens))
    # Every row of every variant produces exactly new_tokens tokens: the end-of-turn tokens are
    # suppressed by the same logits processor everywhere (same work per step).
    from transformers import LogitsProcessorList, SuppressTokensLogitsProcessor

    no_eos = LogitsProcessorList([SuppressTokensLogitsProcessor(list(enc.token_ids.eos), device=device)])

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    def bare_disc(with_processor: bool) -> None:
        with torch.inference_mode():
            for b, inputs in zip(batches, pre):
                model(**(processed(b) if with_processor else inputs))

    ref_cfg = copy.deepcopy(gen_cfg)
    ref_cfg.output_hidden_states, ref_cfg.return_dict_in_generate = True, True

    def bare_gen(with_processor: bool, reference: bool = False) -> None:
        with torch.inference_mode():
            for b, inputs in zip(batches, pre):
                model.generate(**(processed(b) if with_processor else inputs),
                               generation_config=ref_cfg if reference else gen_cfg, logits_processor=no_eos)

    ume_gen_kwargs = dict(logits_processor=no_eos)
    variants = {
        "disc: encode": lambda: enc.encode(items, mode="disc"),
        "disc: bare model(**inputs) incl. processor": lambda: bare_disc(True),
        "disc: bare model(**inputs) excl. processor": lambda: bare_disc(False),
        "gen: encode": lambda: enc.encode(items, mode="gen", generation_kwargs=ume_gen_kwargs),
        "gen: bare generate incl. processor": lambda: bare_gen(True),
        "gen: bare generate excl. processor": lambda: bare_gen(False),
    }
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):  # interleaved so machine noise hits every variant alike
        for name, fn in variants.items():
            times[name].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}

    mem = {}
    # Every variant prepares its own inputs inside the measured block (encode always does).
    for name, fn in [("gen: bare generate", lambda: bare_gen(True)),
                     ("gen: encode", variants["gen: encode"]),
                     ("gen: reference (output_hidden_states)", lambda: bare_gen(True, reference=True))]:
        peaks = []
        for _ in range(3):
            with PeakMemory(device) as pm:
                fn()
            peaks.append(pm.peak)
        mem[name] = statistics.median(peaks)

    n_tokens = len(items) * args.new_tokens
    rows = [
        ("disc: encode / bare forward (incl. processor)", med["disc: encode"] / med["disc: bare model(**inputs) incl. processor"], "<= 1.05"),
        ("disc: encode / bare forward (excl. processor)", med["disc: encode"] / med["disc: bare model(**inputs) excl. processor"], ""),
        ("gen: encode / bare generate (incl. processor)", med["gen: encode"] / med["gen: bare generate incl. processor"], "<= 1.10"),
        ("gen: encode / bare generate (excl. processor)", med["gen: encode"] / med["gen: bare generate excl. processor"], ""),
        ("gen peak memory: encode / bare generate", mem["gen: encode"] / max(mem["gen: bare generate"], 1), "<= 1.10"),
        ("gen peak memory: reference / bare generate", mem["gen: reference (output_hidden_states)"] / max(mem["gen: bare generate"], 1), ""),
    ]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"\nencoder overhead: preset={args.preset} device={device_name} dtype={dtype} inputs={len(items)} "
          f"batch={args.batch_size} new_tokens={args.new_tokens} repeats={args.repeats} "
          f"visual tokens/page={statistics.mean(visual_tokens):.0f}")
    print(f"{'measure':<50} {'ratio':>7}  target")
    for name, ratio, target in rows:
        print(f"{name:<50} {ratio:7.3f}  {target}")
    print(f"\ndisc throughput: {len(items) / med['disc: encode']:.2f} inputs/s; "
          f"gen throughput: {n_tokens / med['gen: encode']:.1f} generated tokens/s")
    print("peak extra memory (MB): " + ", ".join(f"{k}: {v / 2**20:.1f}" for k, v in mem.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "preset": args.preset, "device": device_name, "median_seconds": med, "peak_extra_bytes": mem,
        "ratios": {name: ratio for name, ratio, _ in rows},
        "rows": [[name, ratio, target] for name, ratio, target in rows],  # read by run_all.py
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }, indent=2))


if __name__ == "__main__":
    main()
