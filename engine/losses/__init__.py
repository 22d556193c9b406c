"""Losses of the training methods: the causal-LM loss (SFT, evaluation) and the preference losses
(DPO and its variants), as functions of a model and a batch or of log-probabilities."""
