"""A tiny, random, llama-architecture GGUF model for tests, demos and benchmarks.

The model is useless as a language model but real as far as llama.cpp is concerned: a
``llama`` graph (2 layers, embedding 64, 4 heads, feed-forward 128, context 8192), a GPT-2 style
byte-level BPE tokenizer and a ChatML chat template. The file is about 0.6 MB and is written in
well under a second.

How the vocabulary is built: the 256 byte tokens of GPT-2's byte-to-unicode mapping, then BPE
merges learned (deterministically) from a short English text embedded below, then the ChatML
special tokens. llama.cpp's ``gpt-2`` pre-tokenizer splits text the way the trainer below does
(space-prefixed words, digits, punctuation runs), so every merge is reachable.

How the output is made printable and long: random weights would sample arbitrary bytes (invalid
UTF-8) and hit end-of-generation at random. Every token embedding carries a large constant in
dimension 0 and the rest of the network writes only small values into the residual stream, so
after the final RMS norm dimension 0 is always large and positive. Column 0 of the output
projection then acts as a per-token bias: positive for tokens made only of printable ASCII,
strongly negative for control/special tokens and lone non-ASCII bytes. Generation therefore
yields printable text and never stops before ``max_tokens``, which keeps benchmark lengths
deterministic.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
from collections import Counter
from pathlib import Path

__all__ = [
    "BOS_TOKEN",
    "CHATML_TEMPLATE",
    "EOS_TOKEN",
    "SPECIAL_TOKENS",
    "TinyModelSpec",
    "byte_to_unicode",
    "train_bpe",
    "write_tiny_model",
]

# Architecture (llama): small enough to load in milliseconds, big enough to be a real graph.
N_LAYERS = 2
N_EMBD = 64
N_HEAD = 4
N_FF = 128
# Context: the agents' prompts (ReAct's system prompt lists every tool: 1,162 tokens in this
# small vocabulary) must fit with room for a history. Metadata only: the file does not grow, and
# its KV cache is 512 bytes a token.
N_CTX_TRAIN = 8192
N_MERGES = 320

BOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (BOS_TOKEN, IM_START, EOS_TOKEN)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Training text for the merges: plain English, written for this module.
_CORPUS = """\
The service runs agents on top of a language model. Each agent reads the question, thinks about
what it should do next, calls a tool when it needs more information, and then writes an answer.
When the model is slow or the network is down, the service should still behave well: it reports
the problem, it cancels the work that nobody is waiting for, and it keeps the store consistent.
A request that streams tokens to a client has to stop quickly when the client goes away, and the
server has to free the slot that was used for the request. Good tests start a real server on a
free port, send a few requests, cancel one of them in the middle, and check that nothing leaks.
The weather in the morning was cold and clear, and the people in the town walked to the market to
buy bread, fruit, cheese and coffee. Children played in the park while their parents talked about
the news of the day. In the afternoon it started to rain, so everyone went home and made dinner.
Numbers like 1, 2, 10, 42, 100 and 2048 appear in logs; words like time, token, stream, thread,
model, context, request, response, error, retry and timeout appear in almost every report.
"""

# GPT-2's pre-tokenizer regex, restricted to ASCII (Python's re lacks \p{L} and \p{N}).
_PRETOKENIZE = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+""")


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible mapping of the 256 bytes to printable unicode characters."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\xa1"), ord("\xac") + 1),
        *range(ord("\xae"), ord("\xff") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def train_bpe(text: str, n_merges: int) -> list[tuple[str, str]]:
    """Learn up to ``n_merges`` byte-level BPE merges from ``text`` (deterministic).

    Symbols are in GPT-2's byte-to-unicode alphabet, so the merges can go into a GGUF as is.
    """
    b2u = byte_to_unicode()
    words: Counter[tuple[str, ...]] = Counter(
        tuple(b2u[b] for b in piece.encode("utf-8")) for piece in _PRETOKENIZE.findall(text)
    )
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        # Ties broken by the pair itself, so the result never depends on iteration order.
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        merges.append(best)
        joined = best[0] + best[1]
        new_words: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(joined)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            new_words[tuple(merged)] += count
        words = new_words
    return merges


class TinyModelSpec:
    """The vocabulary of the tiny model: tokens, their types and the merges."""

    def __init__(self, n_merges: int = N_MERGES) -> None:
        b2u = byte_to_unicode()
        self.merges = train_bpe(_CORPUS, n_merges)
        tokens = [b2u[b] for b in range(256)]
        seen = set(tokens)
        for left, right in self.merges:
            if left + right not in seen:
                seen.add(left + right)
                tokens.append(left + right)
        self.n_normal = len(tokens)
        self.tokens = [*tokens, *SPECIAL_TOKENS]
        self.bos_id = self.tokens.index(BOS_TOKEN)
        self.eos_id = self.tokens.index(EOS_TOKEN)
        u2b = {u: b for b, u in b2u.items()}
        # Decoded bytes of each normal token, to decide which ones the output layer favours.
        self.token_bytes = [bytes(u2b[ch] for ch in tok) for tok in tokens]

    def is_printable(self, token_id: int) -> bool:
        if token_id >= self.n_normal:
            return False
        return all(0x20 <= b < 0x7F for b in self.token_bytes[token_id])

    def __repr__(self) -> str:
        return f"<TinyModelSpec vocab={len(self.tokens)} merges={len(self.merges)}>"


def write_tiny_model(path: Path, *, seed: int = 0) -> Path:
    """Write the tiny model to ``path`` (atomically: a temp file is renamed) and return ``path``."""
    import gguf  # optional dependency (the ``embedded`` extra)
    import numpy as np

    path = Path(path)
    spec = TinyModelSpec()
    n_vocab = len(spec.tokens)
    rng = np.random.default_rng(seed)

    def small(*shape: int, scale: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    # Embeddings: a large constant in dimension 0 (see the module docstring), small noise elsewhere.
    token_embd = small(n_vocab, N_EMBD, scale=0.1)
    token_embd[:, 0] = 4.0
    # Output projection: a little noise for variety, column 0 is the per-token bias.
    output = small(n_vocab, N_EMBD, scale=0.05)
    output[:, 0] = [1.0 if spec.is_printable(i) else -4.0 for i in range(n_vocab)]

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(tmp, "llama")
    try:
        writer.add_name("tiny-random-llama")
        writer.add_context_length(N_CTX_TRAIN)
        writer.add_embedding_length(N_EMBD)
        writer.add_block_count(N_LAYERS)
        writer.add_feed_forward_length(N_FF)
        writer.add_head_count(N_HEAD)
        writer.add_head_count_kv(N_HEAD)
        writer.add_rope_dimension_count(N_EMBD // N_HEAD)
        writer.add_rope_freq_base(10000.0)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_vocab_size(n_vocab)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)

        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(spec.tokens)
        writer.add_token_types(
            [gguf.TokenType.NORMAL] * spec.n_normal + [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS)
        )
        writer.add_token_merges([f"{left} {right}" for left, right in spec.merges])
        writer.add_bos_token_id(spec.bos_id)
        writer.add_eos_token_id(spec.eos_id)
        writer.add_pad_token_id(spec.bos_id)
        writer.add_add_bos_token(False)
        writer.add_add_eos_token(False)
        writer.add_chat_template(CHATML_TEMPLATE)

        writer.add_tensor("token_embd.weight", token_embd)
        for layer in range(N_LAYERS):
            prefix = f"blk.{layer}"
            writer.add_tensor(f"{prefix}.attn_norm.weight", np.ones(N_EMBD, np.float32))
            writer.add_tensor(f"{prefix}.attn_q.weight", small(N_EMBD, N_EMBD))
            writer.add_tensor(f"{prefix}.attn_k.weight", small(N_EMBD, N_EMBD))
            writer.add_tensor(f"{prefix}.attn_v.weight", small(N_EMBD, N_EMBD))
            writer.add_tensor(f"{prefix}.attn_output.weight", small(N_EMBD, N_EMBD))
            writer.add_tensor(f"{prefix}.ffn_norm.weight", np.ones(N_EMBD, np.float32))
            writer.add_tensor(f"{prefix}.ffn_gate.weight", small(N_FF, N_EMBD))
            writer.add_tensor(f"{prefix}.ffn_up.weight", small(N_FF, N_EMBD))
            writer.add_tensor(f"{prefix}.ffn_down.weight", small(N_EMBD, N_FF))
        writer.add_tensor("output_norm.weight", np.ones(N_EMBD, np.float32))
        writer.add_tensor("output.weight", output)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.tinymodel",
        description="Write a tiny random llama-architecture GGUF model (ChatML, GPT-2 BPE).",
    )
    parser.add_argument("out", type=Path, help="output .gguf path")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    args = parser.parse_args(argv)
    path = write_tiny_model(args.out, seed=args.seed)
    print(f"{path} ({path.stat().st_size} bytes)")
    return 0

