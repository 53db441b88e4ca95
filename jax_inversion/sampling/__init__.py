"""Generation with learned tokens (validation, `sample`, evaluation) and Compositional Inversion's layout guidance."""
