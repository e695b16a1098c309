"""GradGuardCallback in a transformers Trainer on a tiny GPT-2 built from a config (no download);
GuardedTrainer hands each step's loss to the guard.

    HF_HUB_OFFLINE=1 python examples/hf_trainer_guard.py
"""
import math

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

import gradguard as gg
from gradguard.integrations.transformers import GradGuardCallback, GuardedTrainer


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n=256, length=32, vocab=100):
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    calls = {"n": 0}

    def poison(module, inputs, output):  # step 7's forward returns NaN logits
        calls["n"] += 1
        return output * math.nan if calls["n"] == 8 else output

    model.lm_head.register_forward_hook(poison)

    args = TrainingArguments(
        output_dir="hf_out", max_steps=20, per_device_train_batch_size=8, logging_steps=5,
        learning_rate=1e-3,
        max_grad_norm=0.0,   # gradguard clips (and sees the pre-clip gradients)
        report_to=[], save_strategy="no", use_cpu=True)
    cb = GradGuardCallback(clip=gg.GlobalNorm(1.0))
    # GuardedTrainer = Trainer + GradGuardTrainerMixin: hands each step's loss to the callback
    trainer = GuardedTrainer(model=model, args=args, train_dataset=RandomTokens(), callbacks=[cb])
    trainer.train()

    for row in trainer.state.log_history:
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()
               if k.startswith("gradguard/") or k in ("step", "loss")})
    for event in cb.guard.events:
        print(event)


if __name__ == "__main__":
    main()
