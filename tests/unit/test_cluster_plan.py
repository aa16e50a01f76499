"""`disagg up`'s plan refuses settings its pods would refuse, before anything starts."""

from __future__ import annotations

import argparse

import pytest

from services.core.errors import DisaggError
from services.core.pod import add_settings_flags, settings_from_args
from services.decode.server import DecodeSettings
from services.launcher import ClusterPlan


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("prompt_attention", "gpu", "--prompt-attention must be decode or pods"),
        ("step_transport", "udp", "--step-transport must be tcp or grpc"),
        ("transport", "rdma", "--transport must be grpc or nixl"),
        ("remote_prefill_min_tokens", 1, "--remote-prefill-min-tokens must be at least 2"),
    ],
)
def test_bad_plan_settings_are_refused_with_the_flag_named(field: str, value: object, needle: str) -> None:
    with pytest.raises(DisaggError, match=needle):
        ClusterPlan(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["decode", "pods"])
def test_decode_pod_takes_both_prompt_attention_modes(value: str) -> None:
    parser = add_settings_flags(argparse.ArgumentParser(), DecodeSettings)
    settings = settings_from_args(DecodeSettings, parser.parse_args(["--prompt-attention", value]), "decode")
    assert settings.prompt_attention == value


def test_decode_pod_refuses_an_unknown_prompt_attention_mode() -> None:
    parser = add_settings_flags(argparse.ArgumentParser(), DecodeSettings)
    with pytest.raises(DisaggError, match="prompt_attention"):
        settings_from_args(DecodeSettings, parser.parse_args(["--prompt-attention", "everywhere"]), "decode")
