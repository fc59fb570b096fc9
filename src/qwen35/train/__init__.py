"""Training: pretraining from scratch and chat fine-tuning of the same model classes inference uses."""
