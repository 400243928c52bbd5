"""Run ``ume-train sft`` from a YAML config, optionally SIGKILLing itself at a known point (a
real kill -9): right after the checkpoint of a given step (``--kill_at_step N``), or in the
middle of that checkpoint's save, after the model weights are written and before the
optimizer, RNG and trainer state (``--kill_in_save_at_step N``). Prints ``step N`` after each
optimiser step this process ran (so a test can tell a resumed run from a restarted one).

    python sft_kill.py CONFIG.yaml [--kill_at_step N | --kill_in_save_at_step N]
                       [--resume_from_checkpoint true|auto|PATH] [--key value ...]
"""

import os
import signal
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _pop_int(argv: list[str], flag: str) -> int | None:
    if flag not in argv:
        return None
    i = argv.index(flag)
    value = int(argv[i + 1])
    del argv[i:i + 2]
    return value


def main(argv: list[str]) -> None:
    import logging

    from transformers import TrainerCallback

    from ume_train.cli import parse_sft_config
    from ume_train.sft import SFTTrainer

    kill_at = _pop_int(argv, "--kill_at_step")
    kill_in_save_at = _pop_int(argv, "--kill_in_save_at_step")

    class KillAfterSave(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            print(f"step {state.global_step}", flush=True)

        def on_save(self, args, state, control, **kw):
            if state.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    class KilledMidSave(SFTTrainer):
        def _save_optimizer_and_scheduler(self, output_dir):
            # Trainer's order: weights (done), then optimizer/scheduler, RNG, trainer_state.json
            if self.state.global_step == kill_in_save_at:
                assert os.path.isfile(os.path.join(output_dir, "model.safetensors"))
                os.kill(os.getpid(), signal.SIGKILL)
            super()._save_optimizer_and_scheduler(output_dir)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # as ume-train logs
    args = parse_sft_config(argv[0], argv[1:])
    trainer = KilledMidSave(args=args, callbacks=[KillAfterSave()])
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)  # "true"/"auto": the last complete one
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
