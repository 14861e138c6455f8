"""Shared helpers: import the package from this checkout, small models, list conversion."""

import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # bindings/python

import libperl  # noqa: E402

REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
FIXTURES = os.path.join(REPO, "tests", "fixtures")

# A tiny shape so that every test takes milliseconds.
TINY = dict(dim=32, hidden_dim=64, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=40, max_seq_len=32)


def tiny_model(seed=1):
    return libperl.Model.random(seed=seed, **TINY)


def tolist(x):
    """Nested Python lists from a numpy array, a ctypes array or lists."""
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, (list, tuple)):
        return [tolist(v) for v in x]
    try:
        return [v for v in x]
    except TypeError:
        return x


def flat(x):
    x = tolist(x)
    out = []

    def walk(v):
        if isinstance(v, list):
            for i in v:
                walk(i)
        else:
            out.append(v)

    walk(x)
    return out


class TempDir:
    def __enter__(self):
        self.path = tempfile.mkdtemp(prefix="libperl-py-")
        return self.path

    def __exit__(self, *exc):
        shutil.rmtree(self.path, ignore_errors=True)
        return False
