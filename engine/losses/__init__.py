"""Losses of the training methods: the causal-LM loss (SFT, evaluation), the preference losses
(DPO and its variants) and the policy losses (GRPO, Dr. GRPO, RLOO), as functions of a model and a
batch or of log-probabilities."""
