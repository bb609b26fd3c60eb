"""Inference from a decoder: KV-cache generation (decode), text sampling (sample), batched
greedy decoding for evaluation (greedy), `bigmodel chat` (chat) and `bigmodel serve` (serve);
bench_decode times the cache against the former windowed decoders."""
