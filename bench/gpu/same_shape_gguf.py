"""Writes a GGUF with a real model's header (metadata, tokenizer, tensor
names, shapes and quantization types) and random tensor data of valid form,
for timing on a machine the real weights cannot reach (the GPU machine takes
64 MiB per call; the models are 98 and 491 MB). Speed does not depend on the
values, but on zeros it can (hardware compresses them), so the data are
random: quants uniform, block scales small finite halves, norms one.

  python3 same_shape_gguf.py header MODEL.gguf OUT.header   (here: cut the header)
  python3 same_shape_gguf.py expand IN.header OUT.gguf       (there: add data)
"""
import math
import struct
import sys

# ggml type -> (elements per block, bytes per block, offsets of f16 scales)
TYPES = {
    0: (1, 4, None),  # F32
    1: (1, 2, None),  # F16
    2: (32, 18, [0]),  # Q4_0
    3: (32, 20, [0, 2]),  # Q4_1
    6: (32, 22, [0]),  # Q5_0
    7: (32, 24, [0, 2]),  # Q5_1
    8: (32, 34, [0]),  # Q8_0
    10: (256, 84, [80, 82]),  # Q2_K
    11: (256, 110, [108]),  # Q3_K
    12: (256, 144, [0, 2]),  # Q4_K
    13: (256, 176, [0, 2]),  # Q5_K
    14: (256, 210, [208]),  # Q6_K
    30: (1, 2, None),  # BF16
}
SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


class Reader:
    def __init__(self, data):
        self.d, self.p = data, 0

    def take(self, fmt):
        v = struct.unpack_from("<" + fmt, self.d, self.p)
        self.p += struct.calcsize("<" + fmt)
        return v[0]

    def string(self):
        n = self.take("Q")
        s = self.d[self.p:self.p + n]
        self.p += n
        return s.decode("utf-8", "replace")

    def value(self, t):
        if t == 8:
            return self.string()
        if t == 9:
            inner, n = self.take("I"), self.take("Q")
            if inner in SCALAR:  # skip scalar arrays in one step
                self.p += SCALAR[inner] * n
                return None
            return [self.value(inner) for _ in range(n)]
        fmt = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?",
               10: "Q", 11: "q", 12: "d"}[t]
        return self.take(fmt)


def parse(data):
    """Header fields, tensor infos and where the data section starts."""
    r = Reader(data)
    if r.take("I") != 0x46554747:
        raise SystemExit("not a GGUF file")
    version, n_tensors, n_kv = r.take("I"), r.take("Q"), r.take("Q")
    if version < 2:
        raise SystemExit(f"GGUF version {version} not supported")
    meta = {}
    for _ in range(n_kv):
        key = r.string()
        meta[key] = r.value(r.take("I"))
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        dims = [r.take("Q") for _ in range(r.take("I"))]
        tensors.append((name, dims, r.take("I"), r.take("Q")))
    align = meta.get("general.alignment", 32)
    start = (r.p + align - 1) // align * align
    return meta, tensors, start


def nbytes(dims, t):
    per, size, _ = TYPES[t]
    n = math.prod(dims)
    if n % per:
        raise SystemExit(f"{n} elements do not fill blocks of {per}")
    return n // per * size


def cut_header(model, out):
    with open(model, "rb") as f:
        head = f.read(64 << 20)
    _, tensors, start = parse(head)
    with open(out, "wb") as f:
        f.write(head[:start])
    print(f"{len(tensors)} tensors, header {start} bytes -> {out}")


def expand(header, out):
    import numpy as np  # there only: cutting a header needs none

    head = open(header, "rb").read()
    _, tensors, start = parse(head)
    if len(head) != start:
        raise SystemExit("header length does not match its data offset")
    rng = np.random.default_rng(20261126)
    scale = np.array([0.002], dtype=np.float16).view(np.uint8)
    end = 0
    with open(out, "wb") as f:
        f.write(head)
        for name, dims, t, off in sorted(tensors, key=lambda x: x[3]):
            if off < end:
                raise SystemExit(f"{name} overlaps the tensor before it")
            f.write(b"\0" * (off - end))  # alignment padding only
            n = nbytes(dims, t)
            per, size, scales = TYPES[t]
            if t == 0:
                vals = (np.ones(n // 4, np.float32) if len(dims) == 1
                        else rng.standard_normal(n // 4, np.float32) * 0.02)
                buf = vals.tobytes()
            elif t in (1, 30):
                vals = (rng.standard_normal(n // 2, np.float32) * 0.02).astype(np.float16)
                buf = vals.tobytes()
            else:
                blocks = rng.integers(0, 256, size=(n // size, size), dtype=np.uint8)
                for s in scales:
                    blocks[:, s:s + 2] = scale
                if t == 14:  # Q6_K's int8 sub-block scales: small, positive
                    blocks[:, 192:208] = rng.integers(1, 16, size=(n // size, 16), dtype=np.uint8)
                buf = blocks.tobytes()
            f.write(buf)
            end = off + n
    print(f"{len(tensors)} tensors, {start + end} bytes -> {out}")


if __name__ == "__main__":
    {"header": cut_header, "expand": expand}[sys.argv[1]](sys.argv[2], sys.argv[3])
