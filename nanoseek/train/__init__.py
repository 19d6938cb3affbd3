"""Training stages over one shared loop (loop.py): pretraining now; SFT and GRPO build on the same pieces."""
