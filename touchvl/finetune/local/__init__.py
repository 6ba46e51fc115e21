"""provider local: LoRA on an open VLM -- the tiny offline model, data and labels, the trainer, the job."""
