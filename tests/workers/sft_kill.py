"""Run ``ume-train sft`` from a YAML config, optionally SIGKILLing itself right after the
checkpoint of a given step (a real kill -9 at a known point). Prints ``step N`` after each
optimiser step this process ran (so a test can tell a resumed run from a restarted one).

    python sft_kill.py CONFIG.yaml [--kill_at_step N] [--resume_from_checkpoint true] [--key value ...]
"""

import os
import signal
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str]) -> None:
    from transformers import TrainerCallback

    from ume_train.cli import parse_sft_config
    from ume_train.sft import SFTTrainer

    kill_at = None
    if "--kill_at_step" in argv:
        i = argv.index("--kill_at_step")
        kill_at = int(argv[i + 1])
        del argv[i:i + 2]

    class KillAfterSave(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            print(f"step {state.global_step}", flush=True)

        def on_save(self, args, state, control, **kw):
            if state.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    args = parse_sft_config(argv[0], argv[1:])
    trainer = SFTTrainer(args=args, callbacks=[KillAfterSave()])
    resume = True if args.resume_from_checkpoint in ("true", "True") else None
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
