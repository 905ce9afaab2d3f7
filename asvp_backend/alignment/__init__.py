"""Feature and training alignment: transferability scores (LogME, LogME-PED), the alignment policy, fine-tuning."""
