"""Prompts to conditioning: placeholder tokens and their rows, and the text encoders run with learned rows (what training and sampling share)."""
