"""Decoding: KV cache, logits processors, sampling, beam search, speculative decoding, streaming."""
