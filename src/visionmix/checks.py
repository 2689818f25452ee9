"""Argument and input checks shared by the whole package (layers, models, engine, bench): one clear ``ValueError``/
``TypeError`` naming the argument and what was expected, never an assert."""

from __future__ import annotations

from collections.abc import Collection

import torch

from visionmix.errors import InvalidType, InvalidValue


def check_positive(name: str, value: int) -> int:
    """Return ``value`` if it is a positive int, else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidType(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value <= 0:
        raise InvalidValue(f"{name} must be a positive integer, got {value}")
    return value


def check_divisible(name: str, value: int, divisor: int, divisor_name: str) -> None:
    """Raise unless ``value`` is a multiple of ``divisor``."""
    if value % divisor != 0:
        raise InvalidValue(f"{name}={value} must be divisible by {divisor_name}={divisor}")


def check_conv_channels(in_channels: int, out_channels: int, groups: int, groups_name: str = "groups") -> None:
    """Raise unless the channel counts and ``groups`` are positive ints and both counts are multiples of ``groups``.

    ``groups_name`` names the divisor in the message when it is a derived count (e.g. ``"groups*parts"``).
    """
    check_positive("in_channels", in_channels)
    check_positive("out_channels", out_channels)
    check_positive(groups_name, groups)
    check_divisible("in_channels", in_channels, groups, groups_name)
    check_divisible("out_channels", out_channels, groups, groups_name)


def check_choice(name: str, value: object, choices: Collection[object]) -> None:
    """Raise unless ``value`` is one of ``choices``."""
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise InvalidValue(f"{name} must be one of {allowed}; got {value!r}")


def to_pair(name: str, value: int | tuple[int, int]) -> tuple[int, int]:
    """``3 -> (3, 3)``; a pair is returned as a tuple. Both entries must be positive."""
    if isinstance(value, int):
        pair: tuple = (value, value)
    elif isinstance(value, tuple | list):
        pair = tuple(value)
    else:
        raise InvalidType(f"{name} must be an int or a pair of ints, got {type(value).__name__} ({value!r})")
    if len(pair) != 2:
        raise InvalidValue(f"{name} must be an int or a pair of ints, got {value!r}")
    for v in pair:
        check_positive(name, v)
    return pair  # type: ignore[return-value]


def same_padding(kernel_size: int, dilation: int = 1) -> int:
    """Padding that keeps the spatial size at stride 1 for an odd kernel: ``dilation * (k - 1) // 2``."""
    return dilation * (kernel_size - 1) // 2


def check_input(x: torch.Tensor, channels: int | None, *, ndim: int = 4, channel_dim: int = 1,
                layout: str = "NCHW") -> None:
    """Check an input's rank and channel count once, cheaply, with expected-vs-got in the message."""
    if x.dim() != ndim:
        raise InvalidValue(f"expected a {ndim}D {layout} input, got a {x.dim()}D tensor of shape {tuple(x.shape)}")
    if channels is not None and x.shape[channel_dim] != channels:
        raise InvalidValue(
            f"expected {channels} channels (dim {channel_dim} of {layout}), got {x.shape[channel_dim]} "
            f"in an input of shape {tuple(x.shape)}"
        )
