"""Quest's per-page key bounds, stored narrow: float8 (e5m2) rounded outward, packed as [kmax, kmin].

A page's bounds are the element-wise max and min of its keys ([D] each), stored together as one
[2, D] row in BOUNDS_DTYPE (one byte per component, a quarter of fp32 K/V's bytes), kmax rounded up
and kmin rounded down, so the stored box still contains every key of the page:

    x ─clamp to ±max of the dtype─▶ to(dtype) ─one step outward where rounding went inward─▶ stored
                                                 (a component past the range: NaN, "no bound")

`page_upper_bounds` reads a NaN as no bound: the page's bound is +inf, never below its true max q·k.
Float8 has no `nextafter` in torch, so the outward step moves the sign-magnitude bits by one.

Why e5m2 rather than e4m3 (one more mantissa bit): at 4-position pages and budget 1/4 (2K contexts,
SmolLM2-135M, the command in quest.py's docstring) they select alike (top-1 agreement / ppl vs dense / mass
recall 0.961 / 1.015 / 0.900 against e4m3's 0.969 / 1.014 / 0.901), e5m2's range (±57344) holds any
key a float16 holds, and e5m2 is the top byte of a float16, so widening it is one shift and a
float16 conversion (`widen`), several times faster on CPUs than torch's float8 conversion, which
dominated a Quest step with small pages.
"""

from __future__ import annotations

import torch

BOUNDS_DTYPE = torch.float8_e5m2  # 1 byte per component: 2 mantissa bits, range ±57344, inf and NaN


def round_outward(x: torch.Tensor, dtype: torch.dtype, down: bool) -> torch.Tensor:
    """x in `dtype`, rounded down (kmin) or up (kmax), so the stored bounds still bound every key;
    a value past the dtype's range is stored as NaN (read back as unbounded)."""
    if dtype == x.dtype:
        return x
    top = torch.finfo(dtype).max
    y = x.clamp(-top, top).to(dtype)
    wrong = y.to(x.dtype) > x if down else y.to(x.dtype) < x
    past = x.abs() > top
    if dtype.itemsize > 1:
        toward = torch.full_like(y, float("-inf") if down else float("inf"))
        return torch.where(wrong, torch.nextafter(y, toward), y).masked_fill(past, float("nan"))
    y = torch.where(wrong, _step_float8(y, down), y)
    return y.view(torch.uint8).masked_fill(past, 0x7F).view(dtype)  # 0x7F: NaN in both float8s


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


def widen(x: torch.Tensor) -> torch.Tensor:
    """x as float32. float8 e5m2 is the top byte of a float16 (NaN and inf included): one shift and
    a float16 widening, several times faster on CPUs than torch's float8 conversion."""
    if x.dtype == torch.float8_e5m2:
        return (x.view(torch.uint8).to(torch.int16) << 8).view(torch.float16).float()
    return x.float()


def page_upper_bounds(
    q: torch.Tensor,  # [n, G, D]
    bounds: torch.Tensor,  # [n, P, 2, D] per page: the keys' element-wise max, then their min
) -> torch.Tensor:  # [n, G, P] >= max over the page's keys of q · k; +inf where a bound is NaN
    """u(q, page) = Σ_d max(q_d · kmin_d, q_d · kmax_d) = q⁺ · kmax + q⁻ · kmin, as one bmm of
    [q⁺, q⁻] with the packed bounds."""
    n, p, _, d = bounds.shape
    qf = q.float()
    signed = torch.cat([qf.clamp(min=0), qf.clamp(max=0)], dim=-1)  # [n, G, 2D]
    upper = torch.bmm(signed, widen(bounds.reshape(n, p, 2 * d)).transpose(1, 2))
    return upper.nan_to_num_(nan=float("inf"))
