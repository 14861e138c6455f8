"""Reward models, generation and policy training through the bindings."""

import os
import unittest

from _util import TempDir, flat, libperl, tiny_model, tolist

from libperl import _capi as C

HAVE_REWARD = not any(n.startswith("perl_reward") for n in C.MISSING)
HAVE_POLICY = not any(n.startswith(("perl_policy", "perl_generate")) for n in C.MISSING)


@unittest.skipUnless(HAVE_REWARD, "the library does not export perl_reward_* yet")
class RewardTest(unittest.TestCase):
    def test_pairwise_training_separates_pairs(self):
        with tiny_model() as m, libperl.Lora(m, rank=4, targets="all") as lora:
            lora.set_optimizer(lr=1e-2)
            reward = libperl.Reward(m, lora, objective="pairwise", seed=3)
            chosen, rejected = [[1, 3, 4, 5], [1, 6, 7]], [[1, 30, 31, 32], [1, 33, 34]]
            first, c0, r0 = reward.step_pairwise(chosen, rejected)
            self.assertEqual(len(tolist(c0)), 2)
            for _ in range(20):
                stats, _, _ = reward.step_pairwise(chosen, rejected)
            self.assertLess(stats["loss"], first["loss"])
            self.assertEqual(stats["accuracy"], 1.0)
            c, r = flat(reward.score(chosen)), flat(reward.score(rejected))
            self.assertTrue(all(a > b for a, b in zip(c, r)))
            reward.close()

    def test_pointwise_and_save_load(self):
        with tiny_model() as m, TempDir() as d:
            lora = libperl.Lora(m, rank=2)
            reward = libperl.Reward(m, lora, objective="pointwise")
            stats, scores = reward.step_pointwise([[1, 2, 3], [1, 4]], [1, 0])
            self.assertEqual(len(tolist(scores)), 2)
            self.assertEqual(stats["step"], 1)
            want = flat(reward.score([[1, 2, 3], [1, 4]]))
            reward.save(d)
            with libperl.Reward.load(m, d) as again:
                self.assertFalse(again.lora.closed)
                got = flat(again.score([[1, 2, 3], [1, 4]]))
                for x, y in zip(got, want):
                    self.assertAlmostEqual(x, y, places=5)
                owned = again.lora
            self.assertTrue(owned.closed)  # Reward.load's adapter is closed with it
            with self.assertRaises(libperl.InvalidArgumentError):
                reward.step_pointwise([[1, 2]], [0.5])


@unittest.skipUnless(HAVE_POLICY, "the library does not export perl_generate / perl_policy_* yet")
class PolicyTest(unittest.TestCase):
    def test_generate(self):
        with tiny_model() as m:
            out = m.generate([[1, 2, 3], [1, 4]], max_new_tokens=5, temperature=0.0)
            self.assertEqual(len(tolist(out.tokens)), 2)
            self.assertEqual(len(tolist(out.tokens)[0]), 5)
            lengths = tolist(out.lengths)
            self.assertTrue(all(1 <= n <= 5 for n in lengths))
            again = m.generate([[1, 2, 3], [1, 4]], max_new_tokens=5, temperature=0.0)
            self.assertEqual(tolist(out.tokens), tolist(again.tokens))
            s1 = m.generate([[1, 2]], max_new_tokens=4, temperature=1.0, seed=7, stop_tokens=[39])
            s2 = m.generate([[1, 2]], max_new_tokens=4, temperature=1.0, seed=7, stop_tokens=[39])
            self.assertEqual(tolist(s1.tokens), tolist(s2.tokens))
            self.assertTrue(all(v <= 0.0 for v in flat(s1.logprobs)))

    def test_rloo_steps_and_checkpoint(self):
        with tiny_model() as m, TempDir() as d:
            policy = libperl.Lora(m, rank=2, targets="attention")
            policy.set_optimizer(lr=1e-2)
            trainer = libperl.PolicyTrainer(m, policy, algorithm="rloo", group_size=2, kl_coef=0.01,
                                            loss_norm="sequence")
            prompts = [[1, 2, 3], [1, 2, 3], [1, 5], [1, 5]]
            out = m.generate(prompts, adapter=policy, max_new_tokens=4, seed=1)
            rewards = [float(sum(r[:n])) / 10.0 for r, n in zip(tolist(out.tokens), tolist(out.lengths))]
            before = flat(policy.params())
            stats = trainer.step(prompts, out.tokens, rewards, response_lengths=out.lengths)
            self.assertEqual(stats["step"], 1)
            self.assertNotEqual(flat(policy.params()), before)
            # ragged lists work too
            stats = trainer.step(prompts, [[4, 5], [6], [7, 8, 9], [10]], [1.0, 0.0, 0.5, 0.2])
            self.assertEqual(stats["step"], 2)
            trainer.save(d)
            self.assertTrue(os.path.exists(os.path.join(d, "adapter", "adapter_model.safetensors")))
            trainer.load(d)
            with self.assertRaises(libperl.NumericError):
                trainer.step(prompts, [[4, 5]] * 4, [1.0, float("nan"), 0.0, 0.0])
            trainer.close()
            self.assertFalse(policy.closed)
            policy.close()

    def test_trainer_keeps_borrowed_objects_alive(self):
        m = tiny_model()
        trainer = libperl.PolicyTrainer(m, libperl.Lora(m, rank=2))
        self.assertFalse(trainer.policy.closed)
        trainer.step([[1, 2]], [[3, 4]], [1.0])
        trainer.policy.close()  # closing the adapter first closes the trainer
        self.assertTrue(trainer.closed)
        m.close()


if __name__ == "__main__":
    unittest.main()
