"""A tiny safetensors writer and reader in plain numpy/torch.

The format (https://github.com/huggingface/safetensors):

    8 bytes   little-endian uint64 N, the length of the JSON header
    N bytes   JSON header: {"__metadata__": {str: str, ...},
                            name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...}
              padded with spaces so that the data begins at an 8-byte boundary
    ...       raw little-endian tensor data; offsets are relative to the data
              start, tensors are contiguous (no holes), row-major

Only the dtypes libperl's fixtures and checkpoints use are supported:
F32, I32, BF16 and F16.
"""

import json
import os
import struct

import numpy as np
import torch

# dtype name -> (torch dtype a tensor is converted to before writing, numpy dtype on disk)
_DTYPES = {
    "F32": (torch.float32, np.dtype("<f4")),
    "I32": (torch.int32, np.dtype("<i4")),
    "BF16": (torch.bfloat16, np.dtype("<u2")),
    "F16": (torch.float16, np.dtype("<f2")),
}


def _default_dtype(tensor):
    if tensor.dtype in (torch.float64, torch.float32):
        return "F32"
    if tensor.dtype in (torch.int64, torch.int32, torch.uint8, torch.bool):
        return "I32"
    if tensor.dtype == torch.bfloat16:
        return "BF16"
    if tensor.dtype == torch.float16:
        return "F16"
    raise ValueError(f"no safetensors dtype for {tensor.dtype}")


def _to_bytes(tensor, dtype):
    torch_dtype, np_dtype = _DTYPES[dtype]
    t = tensor.detach().cpu().contiguous().to(torch_dtype)
    if dtype == "BF16":
        # numpy has no bfloat16: reinterpret the bits (torch rounds to nearest even)
        arr = t.view(torch.int16).numpy().view(np.uint16)
    else:
        arr = t.numpy()
    return arr.astype(np_dtype, copy=False).tobytes()


def save_file(path, tensors, metadata=None):
    """Writes `tensors` (name -> tensor, or name -> (tensor, dtype name)) to `path`.

    Tensors keep the given order.  float64 tensors are stored as F32, integer
    and bool tensors as I32 unless a dtype is given.  The file is written to a
    temporary name and renamed, so a reader never sees half a file.
    """
    header = {}
    if metadata is not None:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs = []
    offset = 0
    for name, value in tensors.items():
        tensor, dtype = value if isinstance(value, tuple) else (value, _default_dtype(value))
        blob = _to_bytes(tensor, dtype)
        header[name] = {
            "dtype": dtype,
            "shape": [int(s) for s in tensor.shape],
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 8)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)
    os.replace(tmp, path)


def load_file(path):
    """Reads a safetensors file: returns (dict name -> torch tensor, metadata dict).

    F32/I32/F16 come back in their own dtype; BF16 comes back as float32
    (exactly: bfloat16 is the upper half of a float32).
    """
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path}: truncated")
    (n,) = struct.unpack("<Q", raw[:8])
    if 8 + n > len(raw):
        raise ValueError(f"{path}: header length {n} past end of file")
    header = json.loads(raw[8 : 8 + n].decode("utf-8"))
    data = raw[8 + n :]
    metadata = header.pop("__metadata__", {})
    tensors = {}
    expected = 0
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        begin, end = info["data_offsets"]
        if begin != expected or end > len(data):
            raise ValueError(f"{path}: tensor {name} has bad data_offsets {begin}, {end}")
        expected = end
        dtype = info["dtype"]
        np_dtype = _DTYPES[dtype][1]
        count = int(np.prod(info["shape"], dtype=np.int64))
        if end - begin != count * np_dtype.itemsize:
            raise ValueError(f"{path}: tensor {name} size does not match its shape")
        arr = np.frombuffer(data[begin:end], dtype=np_dtype).reshape(info["shape"])
        if dtype == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))
    if expected != len(data):
        raise ValueError(f"{path}: {len(data) - expected} trailing bytes after the last tensor")
    return {name: tensors[name] for name in header}, metadata
