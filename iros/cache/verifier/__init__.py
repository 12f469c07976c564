"""The semantic cache's second opinion: is the nearest cached question really the same question?
Inference only; the training code lives in tools/verifier/, outside the wheel."""
