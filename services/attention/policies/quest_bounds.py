"""Quest's per-page key bounds, stored narrow: float8 (e4m3) rounded outward, saturation = unbounded.

A page's bounds are the element-wise min and max of its keys ([D] each). Stored in BOUNDS_DTYPE
(one byte per component, a quarter of fp32 K/V's bytes), kmin rounded down and kmax rounded up, so
the stored box still contains every key of the page:

    x ─clamp to ±max of the dtype─▶ to(dtype) ─one step outward where rounding went inward─▶ stored

A component past the dtype's range (|k| >= 448 in e4m3; keys with large biases can get there) is
stored as ±max, which `page_upper_bounds` reads as "no bound": the page's bound is +inf, never
below its true max q·k. Float8 has no `nextafter` in torch, so the outward step moves the
sign-magnitude bits by one (the next representable value away from the rounded one).
"""

from __future__ import annotations

import torch

BOUNDS_DTYPE = torch.float8_e4m3fn  # 1 byte per component; 3 mantissa bits, range ±448


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def round_outward(x: torch.Tensor, dtype: torch.dtype, down: bool) -> torch.Tensor:
    """x in `dtype`, rounded down (kmin) or up (kmax), so the stored bounds still bound every key;
    values past the dtype's range saturate at ±max (read back as unbounded)."""
    if dtype == x.dtype:
        return x
    top = torch.finfo(dtype).max
    x = x.clamp(-top, top)
    y = x.to(dtype)
    wrong = y.to(x.dtype) > x if down else y.to(x.dtype) < x
    if itemsize(dtype) > 1:
        toward = torch.full_like(y, float("-inf") if down else float("inf"))
        return torch.where(wrong, torch.nextafter(y, toward), y)
    return torch.where(wrong, _step_float8(y, down), y)


def _step_float8(y: torch.Tensor, down: bool) -> torch.Tensor:
    """The next float8 value below (down) or above y. Sign-magnitude bits: a step away from zero is
    magnitude + 1, toward zero magnitude - 1, and through zero the smallest value of the other sign.
    Never called on ±max in the outward direction (x was clamped, so rounding could not overshoot)."""
    bits = y.view(torch.uint8).int()
    negative, magnitude = (bits & 0x80) != 0, bits & 0x7F
    shrinks = ~negative if down else negative  # the step moves toward zero
    through_zero = torch.full_like(bits, 0x81 if down else 0x01)
    stepped = torch.where(shrinks, torch.where(magnitude > 0, bits - 1, through_zero), bits + 1)
    return stepped.to(torch.uint8).view(y.dtype)


def page_upper_bounds(
    q: torch.Tensor,  # [n, G, D]
    kmin: torch.Tensor,  # [n, P, D] per-page element-wise min of the keys (any float dtype)
    kmax: torch.Tensor,  # [n, P, D] per-page element-wise max
) -> torch.Tensor:  # [n, G, P] >= max over the page's keys of q · k; +inf where a bound saturated
    """u(q, page) = Σ_d max(q_d · kmin_d, q_d · kmax_d) = q⁺ · kmax + q⁻ · kmin."""
    top = torch.finfo(kmax.dtype).max
    qf, low, high = q.float(), kmin.float(), kmax.float()
    upper = torch.bmm(qf.clamp(min=0), high.transpose(1, 2))
    upper += torch.bmm(qf.clamp(max=0), low.transpose(1, 2))
    saturated = (high >= top).any(dim=-1) | (low <= -top).any(dim=-1)  # [n, P]
    return upper.masked_fill_(saturated[:, None, :], float("inf"))
