"""Counter-based Gaussian noise: an element's value depends on its key and global index only.

A probe that perturbs a sharded tensor (an FSDP2 ``DTensor``) must give every
element the noise it would get in one unsharded process. A stateful generator
cannot: its stream follows the local shard's layout. Here the noise of element
``i`` of tensor ``t`` in direction ``d`` is a pure function of
``(seed, d, t, i)``: a SplitMix64 hash of a Weyl counter gives two 24-bit
uniforms, and Box-Muller turns them into one standard normal, all in vectorised
int64/float32 torch ops on the tensor's own device. Any rank computes the
values of exactly the elements it holds.
"""

from __future__ import annotations

import numpy as np
import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
#: Elements per block of generated noise: bounds the temporaries to ~40 bytes per element.
CHUNK = 1 << 20


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 torch stores (two's complement)."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def tensor_key(seed: int, direction: int, tensor: int) -> int:
    """The 64-bit key of one tensor in one noise direction (``SeedSequence`` of the three)."""
    state = np.random.SeedSequence([seed, direction, tensor]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


def splitmix64_(x: torch.Tensor) -> torch.Tensor:
    """The SplitMix64 finaliser, in place on an int64 tensor (wrapping multiplies)."""
    x.bitwise_xor_(_shift_right(x, 30)).mul_(_signed(_MIX1))
    x.bitwise_xor_(_shift_right(x, 27)).mul_(_signed(_MIX2))
    return x.bitwise_xor_(_shift_right(x, 31))


def _polar(key: int, pair: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Box-Muller radius and angle of the element pairs ``pair`` (int64): one hash per pair."""
    bits = splitmix64_(pair.mul_(_signed(_GOLDEN)).add_(_signed(key + _GOLDEN)))
    scale = 2.0**-24
    # Two 24-bit uniforms from the two halves; u1 in (0, 1] keeps the log finite.
    u1 = (_shift_right(bits, 40).add_(1)).to(torch.float32).mul_(scale)
    u2 = (_shift_right(bits, 8) & 0xFFFFFF).to(torch.float32).mul_(scale * 2.0 * torch.pi)
    return u1.log_().mul_(-2.0).sqrt_(), u2


def normal_range(key: int, start: int, count: int, device: torch.device) -> torch.Tensor:
    """Standard normals (float32) of the global flat positions ``start .. start + count - 1``.

    Positions ``2j`` and ``2j + 1`` share one hash of ``j`` (the cosine and sine of one
    Box-Muller draw), so a range costs one hash per two elements.

    Example::

        >>> z = normal_range(tensor_key(0, 0, 0), 0, 6, torch.device("cpu"))
        >>> torch.equal(z[3:5], normal_range(tensor_key(0, 0, 0), 3, 2, torch.device("cpu")))
        True
    """
    first, last = start // 2, (start + count - 1) // 2
    pair = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    radius, angle = _polar(key, pair)
    z = torch.stack([torch.cos(angle).mul_(radius), torch.sin(angle).mul_(radius)], dim=1)
    offset = start - 2 * first
    return z.flatten()[offset : offset + count]


def normal_at(key: int, index: torch.Tensor) -> torch.Tensor:
    """Standard normals (float32) of arbitrary global flat positions ``index`` (int64)."""
    radius, angle = _polar(key, index >> 1)
    odd = (index & 1).bool()
    return torch.where(odd, torch.sin(angle), torch.cos(angle)).mul_(radius)


def reference_normal(key: int, index: np.ndarray) -> np.ndarray:
    """The same numbers with numpy's unsigned arithmetic: the definition, for tests."""
    with np.errstate(over="ignore"):
        x = (index // 2).astype(np.uint64) * np.uint64(_GOLDEN)
        x = x + np.uint64((key + _GOLDEN) & _MASK64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(_MIX1)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(_MIX2)
        x = x ^ (x >> np.uint64(31))
    u1 = ((x >> np.uint64(40)) + np.uint64(1)).astype(np.float64) * 2.0**-24
    u2 = ((x >> np.uint64(8)) & np.uint64(0xFFFFFF)).astype(np.float64) * 2.0**-24
    radius, angle = np.sqrt(-2.0 * np.log(u1)), 2.0 * np.pi * u2
    return np.where(index % 2 == 1, np.sin(angle), np.cos(angle)) * radius
