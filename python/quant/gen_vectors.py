"""Reference vectors for the quant formats, from the reference libraries themselves.

- MXFP4: transformers' own GPT-OSS dequantization (`convert_moe_packed_tensors`).
- float8 e4m3fn: PyTorch's decoding of all 256 bytes.

Run where torch and transformers are installed (pinned below; the script refuses other
versions unless --any-version is given), then commit the small JSON it writes:

    python3 python/quant/gen_vectors.py --out crates/moe-core/tests/fixtures/quant/reference_vectors.json
"""

import argparse
import json
import struct

PINNED = {"torch": "2.11.0", "transformers": "5.17.0"}


def f32_hex(values):
    return "".join(struct.pack("<f", float(v)).hex() for v in values)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--any-version", action="store_true")
    args = ap.parse_args()

    import torch
    import transformers
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    versions = {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__}
    if versions != PINNED and not args.any_version:
        raise SystemExit(f"versions {versions} differ from the pinned {PINNED}; pass --any-version to override")

    g = torch.Generator().manual_seed(20261123)
    experts, rows, cols = 2, 3, 96  # rows != cols so the output orientation is unambiguous
    blocks = torch.randint(0, 256, (experts, rows, cols // 32, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(112, 140, (experts, rows, cols // 32), dtype=torch.uint8, generator=g)
    # Edge scales: the smallest exponent, 2^0, and a large one that stays finite in bf16.
    scales[0, 0, 0] = 0
    scales[0, 1, 1] = 127
    scales[1, 2, 2] = 250
    out = convert_moe_packed_tensors(blocks.clone(), scales.clone()).float().cpu()
    if tuple(out.shape) == (experts, cols, rows):
        out = out.transpose(1, 2).contiguous()  # transformers returns the x @ W order [E, in, out]
        orientation = "transformers returned [E, in, out]; transposed to [E, out, in]"
    elif tuple(out.shape) == (experts, rows, cols):
        orientation = "transformers returned [E, out, in]"
    else:
        raise SystemExit(f"unexpected output shape {tuple(out.shape)}")

    e4m3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()

    doc = {
        "generator": "python/quant/gen_vectors.py",
        "versions": versions,
        "mxfp4": {
            "experts": experts,
            "rows": rows,
            "cols": cols,
            "blocks_hex": blocks.numpy().tobytes().hex(),
            "scales_hex": scales.numpy().tobytes().hex(),
            "dequant_f32le_hex": f32_hex(out.flatten().tolist()),
            "dtype": "bfloat16 (convert_moe_packed_tensors default), widened to f32",
            "orientation": orientation,
        },
        "e4m3fn_f32le_hex": f32_hex(e4m3.tolist()),
    }
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print("wrote", args.out, versions, orientation)


if __name__ == "__main__":
    main()
