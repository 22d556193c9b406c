"""The errors of reward functions: `RewardError` for the user (exit 2), `SampleError` for a grader.

A reward function is user input (a built-in grader given the wrong data, or the user's own code),
so whatever goes wrong while scoring is a `RewardError`, an InputError whose one line names the
function and the sample (its record's ``file:line`` and the start of its completion).
"""

from __future__ import annotations

from engine.errors import InputError


class RewardError(InputError):
    """A reward function that failed or returned something other than one finite number per completion."""


class SampleError(ValueError):
    """Raised by a reward function about one sample, ``index`` into the batch it was given, so
    that the `RewardError` names that sample rather than the batch's first."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index
