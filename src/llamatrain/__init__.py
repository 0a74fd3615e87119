"""llamatrain: pretraining and supervised fine-tuning of Llama 2-family models."""

__version__ = "0.1.0"
