"""The noise schedule and the samplers that walk it."""
