"""Triton GPU decoders. Each module imports triton lazily through `codecllm.codecs.gpu`."""
