"""Attention policies through the real model (slow): a budget covering the cache generates exactly
dense's greedy tokens (every policy, one continuous batch), `disagg generate` takes the policy
flags, and `disagg eval-attention --json` reports its fields (top-1 agreement 1.0 at full budget)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from services.core.attention import PolicyName, PolicySpec
from services.core.model.load import LoadedModel
from services.decode.colocated import build_engine
from services.decode.sampling import SamplingParams

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
LONG_TEXT = (ROOT / "tests" / "data" / "alice_ch1.txt").read_text()[:900]
SPARSE = [n for n in PolicyName if n is not PolicyName.DENSE]


@pytest.fixture(scope="module")
def prompts(model: LoadedModel) -> list[list[int]]:
    chat = model.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    return [chat, model.tokenizer.encode(LONG_TEXT)]  # ~30 and ~200 tokens (past every floor)


@pytest.mark.timeout(300)
def test_a_budget_covering_the_cache_generates_the_dense_tokens(
    model: LoadedModel, prompts: list[list[int]]
) -> None:
    """One continuous batch: both prompts dense, the long one under every policy at budget 1, and
    the short one at budget 0.05, whose floors (4 sinks + 64 recent tokens) still cover its cache."""
    runs = [(p, None) for p in prompts]
    runs += [(prompts[1], PolicySpec(name, 1.0)) for name in SPARSE]
    runs += [(prompts[0], PolicySpec(name, 0.05)) for name in SPARSE]
    engine = build_engine(model)
    ids = [
        engine.add_request(p, SamplingParams(max_tokens=16, temperature=0, attention_policy=policy))
        for p, policy in runs
    ]
    tokens: dict[int, list[int]] = {i: [] for i in ids}
    while engine.has_work():
        for event in engine.step():
            if event.token_id is not None:
                tokens[event.seq_id].append(event.token_id)
    dense = {tuple(p): tokens[i] for i, (p, policy) in zip(ids, runs, strict=True) if policy is None}
    for i, (p, policy) in zip(ids, runs, strict=True):
        assert tokens[i] == dense[tuple(p)], policy
    assert len(dense[tuple(prompts[1])]) == 16


def _disagg(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.timeout(300)
def test_generate_takes_the_policy_flags(model_folder: Path) -> None:
    base = ["generate", "--model", str(model_folder), "--json", "--temperature", "0", "--max-tokens", "8"]
    low = _disagg(*base, "--attention-policy", "heavy_hitter", "--attention-budget", "0.1", LONG_TEXT)
    assert len(json.loads(low.splitlines()[-1])["token_ids"]) == 8
    bad = subprocess.run(
        [sys.executable, "-m", "services.cli", *base, "--attention-policy", "lru", "x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "sink_window" in bad.stderr


@pytest.mark.timeout(600)
def test_eval_attention_json_at_full_budget_is_dense(model_folder: Path, tmp_path: Path) -> None:
    plot = tmp_path / "quality.png"
    tiny = ["--windows", "1", "--context", "160", "--scored", "8", "--agreement-steps", "4"]
    tiny += ["--passkey-lengths", "200", "--passkey-trials", "1", "--timing-rounds", "2"]
    tiny += ["--model", str(model_folder)]
    out = _disagg(
        "eval-attention", "--policy", "quest", "--budget", "1.0", "--json", "--plot", str(plot), *tiny
    )
    result = json.loads(out.strip().splitlines()[-1])
    required = {"policy", "budget", "top1_agreement", "perplexity", "dense_perplexity", "passkey_accuracy"}
    required |= {"dense_passkey_accuracy", "bytes_ratio", "step_time_ratio", "attention_mass_recall"}
    assert required <= set(result)
    assert (result["policy"], result["budget"]) == ("quest", 1.0)
    assert result["top1_agreement"] == 1.0 and result["attention_mass_recall"] == pytest.approx(1.0)
    assert result["perplexity"] == result["dense_perplexity"] and result["bytes_ratio"] == 1.0
    assert result["passkey_accuracy"] == result["dense_passkey_accuracy"]
    assert plot.stat().st_size > 10_000
