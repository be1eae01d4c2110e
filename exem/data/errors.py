"""The data layer's user-facing errors: one line naming the path and the problem.

- :class:`VolumeError`: a volume that cannot be read or used as given.
- :class:`ChannelNotChosenError`: a multi-channel volume opened without a channel; its hint names the option in the
  words of the tool that opened it (:func:`channel_option`), e.g. ``input_channel=`` for ``exem-segment``, whose
  ``channel=`` is the model's output channel.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["ChannelNotChosenError", "VolumeError", "channel_option"]

DEFAULT_CHANNEL_OPTION = "channel=<index or name>"


class VolumeError(ValueError):
    """A user-facing data problem; ``str(e)`` is one line naming the path and the problem."""


class ChannelNotChosenError(VolumeError):
    """A multi-channel volume and no channel chosen: ``problem`` (path, what the volume holds) and ``option``, how
    the caller chooses one. Pickles (DataLoader workers) with both."""

    def __init__(self, problem: str, option: str = DEFAULT_CHANNEL_OPTION) -> None:
        super().__init__(problem, option)
        self.problem = problem
        self.option = option

    def __str__(self) -> str:
        return f"{self.problem}; if the first axis holds channels, choose one with {self.option}"


@contextmanager
def channel_option(option: str) -> Iterator[None]:
    """Volumes opened inside name ``option`` (e.g. ``"input_channel=<index or name>"``) in their
    :class:`ChannelNotChosenError` hint instead of ``channel=``."""
    try:
        yield
    except ChannelNotChosenError as e:
        raise ChannelNotChosenError(e.problem, option) from None
