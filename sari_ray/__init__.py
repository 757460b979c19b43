"""sari-ray: SFT warm-up + curriculum GRPO for audio-language models, distributed with Ray."""
