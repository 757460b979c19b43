"""Data: the sample schema, readers (own jsonl, MMAU, R1-AQA), audio decoding, validation and the
synthetic audio-question generator. Importing this package imports nothing heavy; torch/torchaudio and
HF datasets are imported only by the functions that need them."""
