"""Training the semantic cache's verifier (scripts/train-verifier): not part of the wheel; needs
scikit-learn (the test extra) and the QQP pairs under ../shared/data."""
