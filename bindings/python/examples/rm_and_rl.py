#!/usr/bin/env python3
"""Reward model, then RL, on a small random Llama — the whole PERL loop from Python.

1. A reward model (LoRA + scalar head) learns a synthetic preference: responses
   made of low token ids are preferred to responses of high ids.
2. A second LoRA adapter on the same frozen base is trained as a policy with
   RLOO: sample from the policy, score with the reward model, step.

Runs in a few seconds on a laptop; numpy is optional.

    make && PYTHONPATH=bindings/python python3 bindings/python/examples/rm_and_rl.py
"""

import argparse
import random
import sys
import time

import libperl

VOCAB = 64


def preference_pairs(rng, n, prompt_len=4, response_len=6):
    """(chosen, rejected) token lists: the same prompt, a low-id vs a high-id response."""
    chosen, rejected = [], []
    for _ in range(n):
        prompt = [1] + [rng.randrange(3, VOCAB) for _ in range(prompt_len - 1)]
        low = [rng.randrange(3, VOCAB // 2) for _ in range(response_len)]
        high = [rng.randrange(VOCAB // 2, VOCAB) for _ in range(response_len)]
        chosen.append(prompt + low)
        rejected.append(prompt + high)
    return chosen, rejected


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rm-steps", type=int, default=30)
    ap.add_argument("--rl-steps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", help="directory for the policy checkpoint (optional)")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    libperl.set_num_threads(2)
    print(f"libperl {libperl.version()} from {libperl.library_path} (numpy: {libperl.HAVE_NUMPY})")

    with libperl.Model.random(seed=args.seed, dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                              vocab_size=VOCAB, max_seq_len=64) as model:
        print(model)

        # ---- 1. reward model ------------------------------------------------------------
        rm_lora = libperl.Lora(model, rank=8, alpha=16, targets="all", seed=1)
        rm_lora.set_optimizer(lr=3e-3, max_grad_norm=1.0)
        reward = libperl.Reward(model, rm_lora, objective="pairwise", seed=2)
        t0 = time.perf_counter()
        for step in range(1, args.rm_steps + 1):
            chosen, rejected = preference_pairs(rng, 8)
            stats, _, _ = reward.step_pairwise(chosen, rejected)
            if step == 1 or step % 10 == 0:
                print(f"rm step {step:3d}  loss {stats['loss']:.4f}  accuracy {stats['accuracy']:.2f}  "
                      f"margin {stats['mean_margin']:+.3f}")
        chosen, rejected = preference_pairs(rng, 32)
        sc, sr = reward.score(chosen), reward.score(rejected)
        held_out = sum(1 for a, b in zip(sc, sr) if a > b) / len(chosen)
        print(f"reward model: held-out pairwise accuracy {held_out:.2f} ({time.perf_counter() - t0:.2f} s)")

        # ---- 2. RL on a policy adapter ------------------------------------------------------
        group = 4
        policy = libperl.Lora(model, rank=4, alpha=8, targets="attention", seed=3)
        policy.set_optimizer(lr=1e-2)
        with libperl.PolicyTrainer(model, policy, algorithm="rloo", group_size=group, kl_coef=0.02,
                                   loss_norm="sequence") as trainer:
            t0 = time.perf_counter()
            for step in range(1, args.rl_steps + 1):
                prompts = []
                for _ in range(2):
                    p = [1] + [rng.randrange(3, VOCAB) for _ in range(3)]
                    prompts += [p] * group  # a group of responses per prompt
                out = model.generate(prompts, adapter=policy, max_new_tokens=6, temperature=1.0,
                                     seed=args.seed * 1000 + step)
                rows = [list(p) + list(r[:n]) for p, r, n in zip(prompts, out.tokens, out.lengths)]
                rewards = reward.score(rows)
                stats = trainer.step(prompts, out.tokens, rewards, response_lengths=out.lengths,
                                     old_logprobs=None)
                print(f"rl step {step:3d}  reward {stats['mean_reward']:+.3f} ± {stats['std_reward']:.3f}  "
                      f"kl {stats['kl']:.4f}  loss {stats['loss']:+.4f}  grad norm {stats['grad_norm']:.3f}")
            print(f"rl: {args.rl_steps} steps in {time.perf_counter() - t0:.2f} s")
            if args.save:
                trainer.save(args.save)
                print(f"saved the policy checkpoint to {args.save}")
        reward.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
