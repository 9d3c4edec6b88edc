#!/usr/bin/env python3
"""Sends one chat prompt to an OpenAI-compatible endpoint and prints the answer as it streams.

Usage: deploy/chat.py URL "prompt" [max_tokens]   (standard library only)
"""
import json
import sys
import urllib.request

url, prompt = sys.argv[1].rstrip("/"), sys.argv[2]
max_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 200
body = {
    "messages": [{"role": "user", "content": prompt}],
    "max_tokens": max_tokens,
    "temperature": 0,
    "stream": True,
    "stream_options": {"include_usage": True},
}
request = urllib.request.Request(
    url + "/v1/chat/completions",
    data=json.dumps(body).encode(),
    headers={"Content-Type": "application/json"},
)
usage = None
with urllib.request.urlopen(request) as response:
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            sys.exit("error: " + chunk["error"]["message"])
        for choice in chunk["choices"]:
            print(choice["delta"].get("content", ""), end="", flush=True)
        usage = chunk.get("usage") or usage
print()
if usage:
    print(f"[{usage['prompt_tokens']} prompt tokens, {usage['completion_tokens']} generated]", file=sys.stderr)
