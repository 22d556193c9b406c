"""The machinery every training run shares, whatever its method: the output folder and its lock,
settled defaults, what a checkpoint was made for, checkpoints, metrics, the learning-rate schedule,
the optimizer step with its guard, and the loop bookkeeping (`engine.run.session.Run`)."""
