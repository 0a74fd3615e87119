"""Data, one way: raw files -> (cleaning) -> tokenizer -> token shards (prepare, parts) -> the
run's cache -> datasets -> the world-size-free sampler -> the prefetching loader. Each step is a
module of its own here; `python -m llamatrain.data` is the command line."""
