"""Chat fine-tuning data: image parts and data URLs, the two generators, the validator, reports and prices."""
