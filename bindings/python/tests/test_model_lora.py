"""Model and Lora: forward, views of adapter memory, save/load, hooks, lifetimes."""

import gc
import os
import unittest

from _util import FIXTURES, TINY, TempDir, flat, libperl, tiny_model, tolist


class ModelTest(unittest.TestCase):
    def test_config_and_forward_shapes(self):
        with tiny_model() as m:
            cfg = m.config
            self.assertEqual((cfg.dim, cfg.vocab_size, cfg.n_layers), (32, 40, 1))
            self.assertGreater(m.num_params, 0)
            logits, hidden = m.forward([[1, 2, 3], [4, 5]], logits=True, hidden=True)
            self.assertEqual(len(tolist(logits)), 2)
            self.assertEqual(len(tolist(logits)[0]), 3)
            self.assertEqual(len(tolist(logits)[0][0]), 40)
            self.assertEqual(len(tolist(hidden)[1][0]), 32)
            # the padded position of row 1 is zero
            self.assertTrue(all(v == 0.0 for v in tolist(logits)[1][2]))
            self.assertEqual(flat(m.forward([1, 2, 3])), flat(m.forward([[1, 2, 3]])))  # one flat row
            lp = tolist(m.token_logprobs([[1, 2, 3]]))
            self.assertEqual(len(lp[0]), 3)
            self.assertTrue(all(v <= 0.0 for v in lp[0]))

    def test_padded_array_with_lengths(self):
        with tiny_model() as m:
            a = tolist(m.forward([[4, 5]]))
            b = tolist(m.forward([[4, 5, 0]], lengths=[2]))
            for x, y in zip(flat(a[0][:2]), flat(b[0][:2])):
                self.assertAlmostEqual(x, y, places=5)

    @unittest.skipUnless(libperl.HAVE_NUMPY, "numpy is not available")
    def test_numpy_zero_copy_inputs_and_outputs(self):
        import numpy as np
        with tiny_model() as m:
            tokens = np.array([[1, 2, 3, 4]], dtype=np.int32)
            out = m.forward(tokens)
            self.assertIsInstance(out, np.ndarray)
            self.assertEqual(out.dtype, np.float32)
            self.assertEqual(out.shape, (1, 4, TINY["vocab_size"]))
            # a non-contiguous int64 input is converted once and gives the same result
            wide = np.array([[1, 9, 2, 9, 3, 9, 4, 9]], dtype=np.int64)[:, ::2]
            np.testing.assert_array_equal(m.forward(wide), out)

    def test_load_fixture_model(self):
        with libperl.Model.load(os.path.join(FIXTURES, "tiny")) as m:
            self.assertEqual(m.config.dim, 32)


class LoraTest(unittest.TestCase):
    def test_params_view_is_the_adapter_memory(self):
        with tiny_model() as m, libperl.Lora(m, rank=2, alpha=4, targets=["q_proj", "v_proj"]) as lora:
            p = lora.params()
            self.assertEqual(len(p), lora.num_params)
            base = flat(m.forward([[1, 2, 3]]))
            self.assertEqual(flat(m.forward([[1, 2, 3]], adapter=lora)), base)  # B = 0: identity
            for i in range(len(p)):
                p[i] = 0.05 * ((i * 7919) % 13 - 6)
            # the write went into the adapter: the output changed, and a new view sees it
            self.assertNotEqual(flat(m.forward([[1, 2, 3]], adapter=lora)), base)
            self.assertAlmostEqual(lora.params()[5], p[5])

    def test_sft_step_reduces_loss_and_grads_view(self):
        with tiny_model() as m, libperl.Lora(m, rank=4, targets="all") as lora:
            lora.set_optimizer(lr=1e-2)
            batch = [[1, 5, 6, 7, 8, 9], [1, 5, 6, 7, 8, 9]]
            first = lora.sft_step(batch)
            for _ in range(15):
                last = lora.sft_step(batch)
            self.assertLess(last["loss"], first["loss"])
            self.assertEqual(last["step"], 16)
            self.assertEqual(last["n_tokens"], 10)
            self.assertTrue(any(g != 0.0 for g in flat(lora.grads())))
            lora.zero_grad()
            self.assertTrue(all(g == 0.0 for g in flat(lora.grads())))

    def test_loss_mask(self):
        with tiny_model() as m, libperl.Lora(m, rank=2) as lora:
            stats = lora.sft_backward([[1, 2, 3, 4]], loss_mask=[[0, 0, 1, 1]])
            self.assertEqual(stats["n_tokens"], 2)

    def test_save_load_roundtrip_and_merge(self):
        with tiny_model() as m, TempDir() as d:
            lora = libperl.Lora(m, rank=2, alpha=4, targets="all", use_rslora=True, init="gaussian", seed=5)
            p = lora.params()
            for i in range(len(p)):
                p[i] = 0.01 * ((i % 17) - 8)
            want = flat(m.forward([[3, 4, 5]], adapter=lora))
            lora.save(d)
            self.assertTrue(os.path.exists(os.path.join(d, "adapter_config.json")))
            with libperl.Lora.load(m, d) as again:
                self.assertEqual(flat(again.params()), flat(p))
                got = flat(m.forward([[3, 4, 5]], adapter=again))
                self.assertEqual(got, want)
            with lora.merge() as merged:
                for x, y in zip(flat(merged.forward([[3, 4, 5]])), want):
                    self.assertAlmostEqual(x, y, delta=1e-4)
            lora.close()

    def test_state_roundtrip(self):
        with tiny_model() as m, TempDir() as d:
            a = libperl.Lora(m, rank=2, seed=1)
            a.set_optimizer(lr=1e-2)
            a.sft_step([[1, 2, 3, 4]])
            a.save_state(os.path.join(d, "state.bin"))
            b = libperl.Lora(m, rank=2, seed=2)
            b.load_state(os.path.join(d, "state.bin"))
            self.assertEqual(flat(a.params()), flat(b.params()))
            # resumes bit-exactly: the next step gives the same numbers
            self.assertEqual(a.sft_step([[4, 3, 2, 1]]), b.sft_step([[4, 3, 2, 1]]))
            self.assertEqual(flat(a.params()), flat(b.params()))

    def test_grad_hook_sees_and_edits_gradients(self):
        with tiny_model() as m, libperl.Lora(m, rank=2) as lora:
            lora.set_optimizer(lr=1e-2)
            seen = []

            def hook(grads):
                seen.append(len(grads))
                for i in range(len(grads)):
                    grads[i] = 0.0  # a zero gradient: AdamW moves nothing
            lora.set_grad_hook(hook)
            before = flat(lora.params())
            lora.sft_step([[1, 2, 3, 4]])
            self.assertEqual(seen, [lora.num_params])
            self.assertEqual(flat(lora.params()), before)

            def failing(grads):
                raise KeyError("from the hook")
            lora.set_grad_hook(failing)
            with self.assertRaises(KeyError) as cm:
                lora.sft_step([[1, 2, 3, 4]])
            self.assertIsInstance(cm.exception.__cause__, libperl.CallbackError)
            lora.set_grad_hook(lambda g: 1)  # a truthy return aborts the step
            with self.assertRaises(libperl.CallbackError):
                lora.sft_step([[1, 2, 3, 4]])
            lora.set_grad_hook(None)
            lora.sft_step([[1, 2, 3, 4]])

    def test_adapter_keeps_its_model_alive(self):
        lora = libperl.Lora(tiny_model(), rank=2)  # no other reference to the model
        gc.collect()
        self.assertFalse(lora.model.closed)
        self.assertEqual(len(flat(lora.model.forward([[1, 2]], adapter=lora))), 2 * TINY["vocab_size"])
        view = lora.params()
        del lora
        gc.collect()
        view[0] = 1.0  # the view keeps the adapter (and so its memory) alive

    def test_closing_the_model_closes_dependents_first(self):
        m = tiny_model()
        lora = libperl.Lora(m, rank=2)
        reward = libperl.Reward(m, lora)
        m.close()
        self.assertTrue(reward.closed)
        self.assertTrue(lora.closed)
        with self.assertRaises(libperl.StateError):
            lora.params()
        m.close()  # idempotent

    def test_bad_options(self):
        with tiny_model() as m:
            with self.assertRaises(libperl.InvalidArgumentError):
                libperl.Lora(m, rank=0)
            with self.assertRaises(ValueError):
                libperl.Lora(m, targets=["nope"])
            with self.assertRaises(TypeError):
                libperl.Lora(m, bogus=1)


if __name__ == "__main__":
    unittest.main()
