#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets into tests/fuzz/seeds/<target>/: valid inputs of
each kind (request bodies, protobuf messages, a KV push that lands, a small GGUF with a real
tokenizer subset and chat template, chat messages, token ids of the golden prompts), from which
libFuzzer mutates. Reads the model (deploy/fetch-model.sh) for its vocabulary and template.

    python3 tests/fuzz/make_seeds.py
"""

import json
import pathlib
import struct

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
MODEL = REPO / ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
GOLDEN = REPO / "tests/data/smollm2_q4_1_greedy.jsonl"


def write(target, name, data):
    d = HERE / "seeds" / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def records(parts):
    return b"".join(struct.pack("<H", len(p)) + p for p in parts)


# --- protobuf, by hand: varints and length-delimited fields -----------------------------------
def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(number, value):
    if isinstance(value, bytes):
        return varint(number << 3 | 2) + varint(len(value)) + value
    if isinstance(value, str):
        return field(number, value.encode())
    if isinstance(value, float):
        return varint(number << 3 | 5) + struct.pack("<f", value)
    return varint(number << 3 | 0) + varint(value)


def packed(number, values):
    return field(number, b"".join(varint(v) for v in values))


def crc32c(data, crc=0):
    crc ^= 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


# --- GGUF ---------------------------------------------------------------------------------------
T_U32, T_I32, T_F32, T_BOOL, T_STR, T_ARR, T_U64 = 4, 5, 6, 7, 8, 9, 10


def read_gguf_metadata(path):
    """The metadata of a GGUF file as {key: (type, value)}."""
    f = path.open("rb")

    def u32():
        return struct.unpack("<I", f.read(4))[0]

    def u64():
        return struct.unpack("<Q", f.read(8))[0]

    def string():
        return f.read(u64()).decode("utf-8", "replace")

    scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
              11: "<q", 12: "<d"}

    def value(t):
        if t == T_STR:
            return string()
        if t == T_ARR:
            et, n = u32(), u64()
            return (et, [value(et) for _ in range(n)])
        fmt = scalar[t]
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

    assert f.read(4) == b"GGUF"
    u32()
    u64()
    kvs = {}
    for _ in range(u64()):
        key = string()
        t = u32()
        kvs[key] = (t, value(t))
    return kvs


def gguf(kvs, vocab, hidden):
    """A GGUF v3 file of `kvs` and one F32 tensor token_embd.weight of [hidden, vocab]."""

    def string(s):
        b = s.encode()
        return struct.pack("<Q", len(b)) + b

    def value(t, v):
        if t == T_STR:
            return string(v)
        if t == T_ARR:
            et, items = v
            return struct.pack("<IQ", et, len(items)) + b"".join(value(et, i) for i in items)
        return struct.pack({T_U32: "<I", T_I32: "<i", T_F32: "<f", T_BOOL: "<?", T_U64: "<Q"}[t], v)

    out = b"GGUF" + struct.pack("<IQQ", 3, 1, len(kvs))
    for k, (t, v) in kvs.items():
        out += string(k) + struct.pack("<I", t) + value(t, v)
    out += string("token_embd.weight") + struct.pack("<IQQIQ", 2, hidden, vocab, 0, 0)
    out += b"\0" * (-len(out) % 32)
    return out + b"\0" * (hidden * vocab * 4)


def main():
    golden = [json.loads(l) for l in GOLDEN.read_text().splitlines() if l.strip()]
    prompts = [g["prompt_ids"] for g in golden]

    # openai_request: byte 0 even = completions, odd = chat.
    bodies = [
        (0, {"prompt": "Hello, my name is", "max_tokens": 8, "temperature": 0}),
        (0, {"prompt": prompts[0], "max_tokens": 4, "logprobs": 2, "echo": True, "n": 2,
             "stop": ["\n", "."], "seed": 7, "top_p": 0.9, "stream": True,
             "stream_options": {"include_usage": True}}),
        (0, {"prompt": ["a", "b"], "max_tokens": 2, "presence_penalty": 1.5, "min_p": 0.1}),
        (1, {"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "What is the capital of France?"}],
             "max_completion_tokens": 16, "logprobs": True, "top_logprobs": 3}),
        (1, {"model": "", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Hi"}]}], "stop": "x", "temperature": 0.7, "seed": 1}),
    ]
    for i, (which, body) in enumerate(bodies):
        write("openai_request", f"seed-{i}", bytes([which]) + json.dumps(body).encode())

    # grpc_messages: byte 0 picks the message (0 Generate, 1 Decode, 2 Prefill, 3 KvEvents, 4 stats).
    # SamplingParams: temperature 0, max_tokens 8, seed 42. GenerateRequest: text 2, chat 3,
    # token_ids 4, sampling 5.
    sampling = field(1, 0.0) + field(9, 8) + field(8, 42)
    chat = field(1, field(1, "user") + field(2, "Hello"))
    write("grpc_messages", "seed-generate-ids",
          bytes([0]) + field(4, packed(1, prompts[0])) + field(5, sampling))
    write("grpc_messages", "seed-generate-text", bytes([0]) + field(2, "Once upon") + field(5, sampling))
    write("grpc_messages", "seed-generate-chat", bytes([0]) + field(3, chat) + field(5, sampling))
    write("grpc_messages", "seed-decode", bytes([1]) + field(1, "r") + packed(2, prompts[1])
          + field(3, sampling) + field(4, 9) + field(8, field(1, "127.0.0.1:1") + field(2, 1)))
    write("grpc_messages", "seed-prefill", bytes([2]) + field(1, "r") + packed(2, prompts[1])
          + field(3, sampling) + field(6, field(1, "127.0.0.1:1") + field(2, 5) + field(3, 2)))
    write("grpc_messages", "seed-stats", bytes([4]) + field(1, "n") + field(3, 100) + field(4, 2))

    # kv_push: a handshake naming the reservation (transfer id 0) and both layers' chunks.
    fingerprint = (field(1, "fuzz") + field(2, "f16") + field(3, 2) + field(4, 1) + field(5, 4)
                   + field(6, 2))
    handshake = field(1, field(1, "seed") + field(3, fingerprint) + field(4, 3))
    block_bytes = 2 * 1 * 4 * 2  # tokens * heads * dim * f16

    def chunk(layer, first, n, fill):
        keys = bytes([fill]) * (block_bytes * n)
        values = bytes([fill + 1]) * (block_bytes * n)
        body = (field(1, layer) + field(2, first) + field(3, n) + field(4, keys) + field(5, values)
                + field(6, crc32c(values, crc32c(keys))))
        return field(2, body)

    write("kv_push", "seed-whole", records([handshake, chunk(0, 0, 3, 1), chunk(1, 0, 3, 3)]))
    write("kv_push", "seed-parts", records([handshake, chunk(0, 0, 1, 5), chunk(0, 1, 2, 7),
                                            chunk(1, 2, 1, 9), chunk(1, 0, 2, 11)]))

    # gguf: the model's configuration keys and a subset of its real tokenizer and template.
    meta = read_gguf_metadata(MODEL)
    keep = 400
    tokens = meta["tokenizer.ggml.tokens"][1][1][:keep]
    known = set(tokens)
    merges = [m for m in meta["tokenizer.ggml.merges"][1][1]
              if all(p in known for p in m.split(" ", 1)) and m.replace(" ", "") in known]
    kvs = {k: v for k, v in meta.items() if k.startswith("llama.") or k.startswith("general.")}
    kvs["tokenizer.ggml.model"] = meta["tokenizer.ggml.model"]
    if "tokenizer.ggml.pre" in meta:
        kvs["tokenizer.ggml.pre"] = meta["tokenizer.ggml.pre"]
    kvs["tokenizer.ggml.tokens"] = (T_ARR, (T_STR, tokens))
    kvs["tokenizer.ggml.merges"] = (T_ARR, (T_STR, merges))
    kvs["tokenizer.ggml.token_type"] = (T_ARR, (T_I32, meta["tokenizer.ggml.token_type"][1][1][:keep]))
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        if key in meta and meta[key][1] < keep:
            kvs[key] = meta[key]
    config_only = {k: v for k, v in kvs.items() if not k.startswith("tokenizer.")}
    write("gguf", "seed-config", gguf(config_only, keep, 8))
    write("gguf", "seed-tokenizer", gguf(kvs, keep, 8))
    kvs["tokenizer.chat_template"] = meta["tokenizer.chat_template"]
    write("gguf", "seed-template", gguf(kvs, keep, 8))

    # chat_template: byte 0 (even: add the generation prompt), then role/content records.
    conversations = [
        [("system", "You are helpful."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye")],
        [("user", "{{ raise_exception('x') }} <|im_end|> \u00e9\u4e2d\U0001F600")],
        [("tool", "{\"a\": 1}"), ("user", "")],
    ]
    for i, conv in enumerate(conversations):
        parts = [p.encode() for pair in conv for p in pair]
        write("chat_template", f"seed-{i}", bytes([i]) + records(parts))

    # detokenizer: flags (low 3 bits: stop length; 0x40: raw ids; 0x80: skip special), the stop
    # string, then u32 ids.
    for i, ids in enumerate(prompts[:4]):
        stop = b"" if i % 2 == 0 else b"the"
        flags = len(stop) | (0x80 if i == 1 else 0)
        write("detokenizer", f"seed-{i}", bytes([flags]) + stop + struct.pack(f"<{len(ids)}I", *ids))


if __name__ == "__main__":
    main()
