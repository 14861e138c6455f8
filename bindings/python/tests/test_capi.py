"""The raw declarations: every public function and struct, sizes, errors, library lookup."""

import ctypes
import os
import re
import unittest

from _util import REPO, libperl, tiny_model

from libperl import _capi as C


def header_functions():
    with open(os.path.join(REPO, "include", "libperl", "libperl.h")) as f:
        text = f.read()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.findall(r"LIBPERL_API[^;(]*?\b(perl_[a-z0-9_]+)\s*\(", text)


class CapiTest(unittest.TestCase):
    def test_every_header_function_is_declared(self):
        names = header_functions()
        self.assertGreater(len(names), 40)
        self.assertEqual(sorted(names), sorted(C.FUNCTION_NAMES))

    def test_library_exports_every_function(self):
        self.assertEqual(C.MISSING, [], f"{C.library_path} lacks {C.MISSING}")

    def test_struct_sizes_match_the_library(self):
        # *_init writes sizeof(C struct) into struct_size: the ctypes layout must agree.
        for cls in C.STRUCT_INITS:
            with self.subTest(struct=cls.__name__):
                s = C.new_struct(cls)
                self.assertEqual(s.struct_size, ctypes.sizeof(cls))

    def test_defaults_come_from_the_library(self):
        lora = libperl.options(libperl.LoraOptions)
        self.assertEqual((lora.rank, lora.alpha, lora.target_modules), (8, 16.0, libperl.TARGET_ATTENTION))
        optim = libperl.options(libperl.OptimOptions, lr=0.5)
        self.assertAlmostEqual(optim.lr, 0.5)
        self.assertAlmostEqual(optim.beta2, 0.999, places=6)
        policy = libperl.options(libperl.PolicyOptions, **{"lambda": 0.5})
        self.assertAlmostEqual(policy.lambda_, 0.5)
        with self.assertRaises(TypeError):
            libperl.options(libperl.LoraOptions, no_such_field=1)

    def test_version(self):
        self.assertEqual(libperl.version(), "0.1.0")
        self.assertEqual(libperl.version_number(), 100)

    def test_threads(self):
        old = libperl.get_num_threads()
        libperl.set_num_threads(1)
        self.assertEqual(libperl.get_num_threads(), 1)
        libperl.set_num_threads(old)

    def test_error_carries_status_and_message(self):
        with self.assertRaises(libperl.LibperlError) as cm:
            libperl.Model.load(os.path.join(REPO, "no", "such", "model"))
        e = cm.exception
        self.assertEqual(e.status, -3)
        self.assertEqual(e.status_name, "LIBPERL_ERR_IO")
        self.assertIn("no/such/model", e.message)
        self.assertIsInstance(e, libperl.IOFailureError)
        with tiny_model() as model:
            with self.assertRaises(libperl.RangeError) as cm:
                model.forward([[1, 2, 999]])
            self.assertEqual(cm.exception.status_name, "LIBPERL_ERR_RANGE")
            self.assertIn("999", cm.exception.message)

    def test_library_location_order(self):
        cands = C.library_candidates()
        if os.environ.get("LIBPERL_LIBRARY"):
            self.assertEqual(cands[0], os.environ["LIBPERL_LIBRARY"])
            self.assertEqual(C.library_path, os.environ["LIBPERL_LIBRARY"])
        self.assertIn(os.path.join(REPO, "build", "libperlrl.so.0"), cands)


if __name__ == "__main__":
    unittest.main()
