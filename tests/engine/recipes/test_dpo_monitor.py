"""The likelihood-displacement watch: warns once, only when the chosen answers lose likelihood
while the margin is positive, and takes up a resumed run's baseline."""

from engine.recipes.dpo_monitor import DisplacementMonitor


def test_warns_once_when_chosen_likelihood_falls_while_the_margin_grows():
    monitor = DisplacementMonitor(threshold=0.5)
    assert monitor.observe(-1.80, 0.0) is None            # step 0: the baseline
    assert monitor.observe(-2.10, 0.4) is None            # fell 0.3: under the threshold
    warning = monitor.observe(-2.46, 0.6, kl=0.12)        # fell 0.66 with a positive margin
    assert "lost 0.66 nats/token" in warning and "-1.80 -> -2.46" in warning and "KL to the reference 0.120" in warning
    assert monitor.observe(-3.30, 1.1) is None            # once per run


def test_no_warning_when_the_margin_is_not_positive_or_the_watch_is_off():
    monitor = DisplacementMonitor(threshold=0.5)
    monitor.observe(-1.8, 0.0)
    assert monitor.observe(-3.0, -0.2) is None
    off = DisplacementMonitor(threshold=0.0)
    off.observe(-1.8, 0.0)
    assert off.observe(-5.0, 2.0) is None


def test_training_lines_are_smoothed_and_resume_restores_the_baseline():
    monitor = DisplacementMonitor(threshold=0.5)
    monitor.observe(-1.0, 0.1, smooth=True)
    assert monitor.observe(-2.0, 0.2, smooth=True) is None  # mean of (-1, -2) = -1.5: fell 0.5, not more
    assert monitor.observe(-2.0, 0.2, smooth=True) is not None
    resumed = DisplacementMonitor(threshold=0.5)
    resumed.resume([{"kind": "eval", "step": 0, "eval/logps/chosen_per_token": -1.7},
                    {"kind": "eval", "step": 5, "eval/logps/chosen_per_token": -1.9}], with_eval=True)
    assert resumed.start == -1.7 and not resumed.warned
    assert "lost 0.60" in resumed.observe(-2.3, 0.5)
