"""Fine-tuning: the provider-independent contract, remote providers, local LoRA training and its server."""
