"""`disagg generate` as a user runs it: a real process, real model, exit codes and stderr."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def run_cli(*args: str, cache: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DISAGG_CACHE_DIR": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=Path(__file__).resolve().parents[2],
    )


def assert_clean_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("disagg: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_json_output_of_a_greedy_chat(model_folder: Path) -> None:
    result = run_cli(
        "generate",
        "--chat",
        "--temperature",
        "0",
        "--json",
        "What is the capital of France?",
        cache=model_folder.parent,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["text"] == "The capital of France is Paris."
    assert out["finish_reason"] == "stop"
    assert out["token_ids"][-1] == 2  # <|im_end|>
    assert isinstance(out["prompt_token_ids"], list) and len(out["prompt_token_ids"]) > 5


def test_streams_text_without_json(model_folder: Path) -> None:
    result = run_cli("generate", "--max-tokens", "5", "--seed", "1", "Hello", cache=model_folder.parent)
    assert result.returncode == 0 and result.stdout.strip()


def test_unknown_model(model_folder: Path) -> None:
    result = run_cli("generate", "--model", "no-such-model", "hi", cache=model_folder.parent)
    assert_clean_error(result, "no-such-model", "smollm2-135m")


def test_corrupt_weights(model_folder: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_folder / name, broken / name)
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    result = run_cli("generate", "--model", str(broken), "hi", cache=model_folder.parent)
    assert_clean_error(result, "model.safetensors")


@pytest.mark.parametrize(
    ("flags", "needle"),
    [(["--max-tokens", "0"], "max_tokens"), (["--temperature", "-0.5"], "temperature")],
)
def test_bad_sampling_flags(model_folder: Path, flags: list[str], needle: str) -> None:
    assert_clean_error(run_cli("generate", *flags, "hi", cache=model_folder.parent), needle)


def test_prompt_longer_than_the_context_window(model_folder: Path) -> None:
    result = run_cli("generate", "word " * 9000, cache=model_folder.parent)
    assert_clean_error(result, "prompt", "shorten")


def test_help_and_light_commands_do_not_import_torch() -> None:
    """`disagg --help` (and the parser every command builds first) stays fast: torch, gguf and
    safetensors load only when a model is resolved or run."""
    code = (
        "import sys; from services.cli import build_parser; build_parser(); "
        "heavy = [m for m in ('torch', 'gguf', 'safetensors') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "", f"imported at parse time: {done.stdout.strip()}"
