"""`helm test`: one chat completion through the gateway Service; exit 0 when the answer is right.

Runs in the disagg image (standard library only). Environment:
  DISAGG_TEST_URL        the gateway, e.g. http://disagg-gateway.ns.svc.cluster.local:80
  DISAGG_TEST_MODEL      the model id to send
  DISAGG_TEST_PROMPT     the user message
  DISAGG_TEST_EXPECT     text the answer must contain ("" = any non-empty answer)
  DISAGG_TEST_KEYS_FILE  the API-key file (TENANT:KEY lines); its first key is sent ("" = no key)
"""

import json
import os
import sys
import time
import urllib.error
import urllib.request


def first_key(path: str) -> str:
    if not path:
        return ""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if line and not line.startswith("#"):
                return line.split(":", 1)[1]
    raise SystemExit(f"FAIL: {path} holds no TENANT:KEY line")


def complete(url: str, body: dict, key: str) -> dict:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", data=json.dumps(body).encode(), headers=headers, method="POST"
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def main() -> int:
    env = os.environ
    body = {
        "model": env["DISAGG_TEST_MODEL"],
        "messages": [{"role": "user", "content": env["DISAGG_TEST_PROMPT"]}],
        "temperature": 0,
        "max_tokens": 24,
    }
    key = first_key(env.get("DISAGG_TEST_KEYS_FILE", ""))
    deadline = time.monotonic() + 60  # the gateway may still be waiting for its pods
    while True:
        try:
            answer = complete(env["DISAGG_TEST_URL"].rstrip("/"), body, key)
            break
        except (urllib.error.URLError, OSError) as exc:
            detail = exc.read().decode(errors="replace") if isinstance(exc, urllib.error.HTTPError) else ""
            if time.monotonic() > deadline:
                print(f"FAIL: no completion from {env['DISAGG_TEST_URL']}: {exc} {detail}")
                return 1
            time.sleep(2)
    text = answer["choices"][0]["message"]["content"]
    expect = env.get("DISAGG_TEST_EXPECT", "")
    print(f"answer: {text!r} (finish_reason {answer['choices'][0]['finish_reason']})")
    if not text.strip() or (expect and expect not in text):
        print(f"FAIL: the answer should contain {expect!r}" if expect else "FAIL: empty answer")
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
