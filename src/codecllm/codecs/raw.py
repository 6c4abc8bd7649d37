"""`raw`: no compression. The baseline path through the same machinery."""

from __future__ import annotations

import torch

from codecllm.codecs.base import LAYOUTS, Codec, EncodedTensor, expect_size


class RawCodec(Codec):
    name = "raw"
    has_gpu_decoder = True  # a plain copy: no kernel needed

    def encode(self, flat):
        data = flat.view(LAYOUTS[flat.dtype].int_dtype).clone()
        return {"data": data}, {}, 1

    def decode_cpu(self, encoded: EncodedTensor, verify: bool = True) -> torch.Tensor:
        data = expect_size(encoded, "data", encoded.numel)
        return data.view(encoded.dtype).clone()

    decode_gpu = decode_cpu
