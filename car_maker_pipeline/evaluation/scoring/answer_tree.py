"""Every answer scored in one forward pass over the answer trie, with the prompt's cache shared, never copied.

Why: scoring each answer in a row of its own repeats the prompt's cache once per answer, all of an
image's keys and values, thousands of tokens at photo sizes. With 196 class names that copying, not
the model, was the cost, and the tokens the classes share (their maker, their model) were fed once per
class. Here each distinct answer prefix (a trie node) is fed once per picture, as one sequence after
the prompt, and wired so that it sees exactly what it would see in a row of its own:

- attention: a node attends to the whole prompt (its padding masked) and to its own ancestors, never to
  another branch; its position is the prompt's last position plus its depth;
- LFM2's short convolution: a node's window is its ancestors, then the tail of the prompt's conv state,
  gathered by index (`AnswerTree.taps`) instead of read from the sequence order.

So the log-probabilities are the per-answer ones (the tests compare them with brute force to 1e-5), and
the cost grows with the trie's nodes instead of answers x prompt. The decoder's layers are run by hand
from their own modules (norms, projections with any LoRA adapter, feed-forward); `check_supported`
refuses a decoder of another shape with a message, before anything is computed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.models.lfm2.modeling_lfm2 import apply_rotary_pos_emb

# Attention scores one query chunk may hold (rows x heads x nodes x keys); 2**27 floats is 512 MiB.
MAX_ATTENTION_SCORES = 2**27


class UnsupportedDecoderError(ValueError):
    """The language model is not LFM2-shaped, so the answer trie cannot be run through it."""


@dataclass(frozen=True)
class AnswerTree:
    """The answers' trie as tensors: the nodes one pass feeds and where each answer's tokens are read.

    A node is an answer prefix of length 1 to len - 1 (end of turn, the last token, is read, never fed);
    nodes are numbered by depth (parents first). An edge is a (node, next token) pair; its log-probability is read from that node's output. The first
    token of every answer is read from the prompt's own pass.
    """

    tokens: torch.Tensor  # (nodes,) the token each node feeds
    depth: torch.Tensor  # (nodes,) 0 for an answer's first token
    ancestors: torch.Tensor  # (nodes, longest - 1): the node itself, its parent, ..., then the node again
    ancestor_bias: torch.Tensor  # (nodes, longest - 1): 0 where `ancestors` holds an ancestor, -inf after
    taps: torch.Tensor  # (nodes, kernel): the conv's inputs oldest first, as indices into [conv state, nodes]
    first: torch.Tensor  # (answers,) each answer's first token
    edge_node: torch.Tensor  # (edges,) ascending: the node whose output predicts the edge's token
    edge_token: torch.Tensor  # (edges,)
    answer_edges: torch.Tensor  # (answers, longest - 1) edge indices, padded with `edges` (reads as 0)

    @staticmethod
    @functools.lru_cache(maxsize=16)
    def build(answers: tuple[tuple[int, ...], ...], kernel: int) -> AnswerTree:
        """The tree of `answers` (token ids, end of turn last) for a short convolution of width `kernel`."""
        index: dict[tuple[int, ...], int] = {}
        longest = max(len(ids) for ids in answers)
        for length in range(1, longest):
            for ids in answers:
                if length < len(ids):
                    index.setdefault(tuple(ids[:length]), len(index))
        prefixes = sorted(index, key=index.get)
        nodes = len(prefixes)
        ancestors = torch.zeros((nodes, max(longest - 1, 1)), dtype=torch.long)
        ancestor_bias = torch.full(ancestors.shape, float("-inf"))
        taps = torch.zeros((nodes, kernel), dtype=torch.long)
        for node, prefix in enumerate(prefixes):
            depth = len(prefix) - 1
            ancestors[node] = node
            for up in range(depth + 1):
                ancestors[node, up], ancestor_bias[node, up] = index[prefix[: len(prefix) - up]], 0.0
            for tap in range(kernel):  # tap kernel - 1 is the node itself, tap 0 the oldest input
                up = kernel - 1 - tap
                taps[node, tap] = kernel + index[prefix[: len(prefix) - up]] if up <= depth else kernel - (up - depth)
        edges = sorted({(index[tuple(ids[:n])], ids[n]) for ids in answers for n in range(1, len(ids))})
        edge_index = {edge: number for number, edge in enumerate(edges)}
        answer_edges = torch.full((len(answers), max(longest - 1, 1)), len(edges), dtype=torch.long)
        for row, ids in enumerate(answers):
            for n in range(1, len(ids)):
                answer_edges[row, n - 1] = edge_index[(index[tuple(ids[:n])], ids[n])]
        return AnswerTree(
            tokens=torch.tensor([prefix[-1] for prefix in prefixes], dtype=torch.long),
            depth=torch.tensor([len(prefix) - 1 for prefix in prefixes], dtype=torch.long),
            ancestors=ancestors,
            ancestor_bias=ancestor_bias,
            taps=taps,
            first=torch.tensor([ids[0] for ids in answers], dtype=torch.long),
            edge_node=torch.tensor([node for node, _ in edges], dtype=torch.long),
            edge_token=torch.tensor([token for _, token in edges], dtype=torch.long),
            answer_edges=answer_edges,
        )


def check_supported(model) -> None:
    """Raise UnsupportedDecoderError unless `model`'s language model is LFM2's (conv and attention layers)."""
    decoder = model.get_decoder()
    needed = ("embed_tokens", "layers", "rotary_emb", "embedding_norm")
    missing = [name for name in needed if not hasattr(decoder, name)]
    for layer in getattr(decoder, "layers", []):
        part = "self_attn" if getattr(layer, "is_attention_layer", False) else "conv"
        if not all(hasattr(layer, name) for name in (part, "operator_norm", "ffn_norm", "feed_forward")):
            missing.append(f"layers[{getattr(layer, 'layer_idx', '?')}].{part}")
    if missing or model.get_output_embeddings() is None:
        raise UnsupportedDecoderError(
            f"{type(decoder).__name__} is not an LFM2 language model (missing {missing or ['lm_head']}); the answer "
            "scoring runs LFM2's conv and attention layers itself. Use an LFM2-VL checkpoint."
        )


@torch.inference_mode()
def answer_log_likelihoods(
    model, cache, prompt_mask, last_position, first_log_probs, answers: Sequence[Sequence[int]], max_logits: int
) -> torch.Tensor:
    """log p(answer | prompt) of every answer for each row, shape (rows, answers), in one pass over the trie.

    `cache` and `first_log_probs` are the prompt pass's (its cache is read, not changed); `prompt_mask`
    (rows, prompt) is its attention mask and `last_position` (rows,) the position of its last token. At
    most `max_logits` logits (rows x nodes x vocabulary) are held at once.
    """
    check_supported(model)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    kernel = next((layer.conv.conv.kernel_size[0] for layer in decoder.layers if not layer.is_attention_layer), 1)
    tree = AnswerTree.build(tuple(tuple(ids) for ids in answers), kernel)
    device, rows = prompt_mask.device, prompt_mask.shape[0]
    hidden = decoder.embed_tokens(tree.tokens.to(device))[None].expand(rows, -1, -1)
    position_ids = last_position[:, None] + 1 + tree.depth.to(device)[None]
    rotary = decoder.rotary_emb(hidden, position_ids)
    prompt_bias = torch.zeros(prompt_mask.shape, dtype=torch.float32, device=device)
    prompt_bias = prompt_bias.masked_fill(prompt_mask == 0, float("-inf"))[:, None, None, None, :]
    ancestors, ancestor_bias = tree.ancestors.to(device), tree.ancestor_bias.to(device)
    taps = tree.taps.to(device)
    for index, layer in enumerate(decoder.layers):
        normed = layer.operator_norm(hidden)
        if layer.is_attention_layer:
            mixed = _attention(
                layer.self_attn, normed, rotary, cache.layers[index], prompt_bias, ancestors, ancestor_bias
            )
        else:
            mixed = _short_conv(layer.conv, normed, cache.get_conv_state(index), taps)
        hidden = hidden + mixed
        hidden = hidden + layer.feed_forward(layer.ffn_norm(hidden))
    hidden = decoder.embedding_norm(hidden)
    edge_log_probs = _edge_log_probs(head, hidden, tree, max_logits)
    return first_log_probs[:, tree.first.to(device)] + edge_log_probs[:, tree.answer_edges.to(device)].sum(-1)


def _attention(attention, normed, rotary, layer_cache, prompt_bias, ancestors, ancestor_bias) -> torch.Tensor:
    """LFM2's attention for the nodes: over the prompt's cached keys, then over each node's own ancestors.

    A node sees at most the longest answer's length in ancestors, so their scores are gathered (nodes x
    longest) instead of masked out of a nodes x nodes square. The softmax spans both parts (float32
    scores), computed in place: few passes over the largest tensor, the scores against the prompt.
    """
    rows, nodes, _ = normed.shape
    shape = (rows, nodes, -1, attention.head_dim)
    query = attention.q_layernorm(attention.q_proj(normed).view(shape)).transpose(1, 2)
    key = attention.k_layernorm(attention.k_proj(normed).view(shape)).transpose(1, 2)
    value = attention.v_proj(normed).view(shape).transpose(1, 2)
    query, key = apply_rotary_pos_emb(query, key, *rotary)
    kv_heads, head_dim = key.shape[1], attention.head_dim
    query = query.reshape(rows, kv_heads, -1, nodes, head_dim) * attention.scaling  # heads grouped by key head
    groups, (prompt_keys, prompt_values) = query.shape[2], (layer_cache.keys, layer_cache.values)
    prompt = prompt_keys.shape[2]
    step = max(1, MAX_ATTENTION_SCORES // (rows * kv_heads * groups * (prompt + ancestors.shape[1])))
    parts = []
    for start in range(0, nodes, step):
        part = slice(start, start + step)
        chunk, near = query[:, :, :, part], ancestors[part]
        on_prompt = (chunk.flatten(2, 3) @ prompt_keys.transpose(-1, -2)).float()
        on_prompt = on_prompt.view(rows, kv_heads, groups, -1, prompt).add_(prompt_bias)
        on_ancestors = torch.einsum("bkgnd,bknjd->bkgnj", chunk, key[:, :, near]).float().add_(ancestor_bias[part])
        peak = torch.maximum(on_prompt.amax(-1, keepdim=True), on_ancestors.amax(-1, keepdim=True))
        on_prompt, on_ancestors = on_prompt.sub_(peak).exp_(), on_ancestors.sub_(peak).exp_()
        total = on_prompt.sum(-1, keepdim=True) + on_ancestors.sum(-1, keepdim=True)
        mixed = (on_prompt.to(value.dtype).flatten(2, 3) @ prompt_values).view(chunk.shape)
        mixed = mixed + torch.einsum("bkgnj,bknjd->bkgnd", on_ancestors.to(value.dtype), value[:, :, near])
        parts.append((mixed.float() / total).to(value.dtype))
    out = torch.cat(parts, dim=3).reshape(rows, -1, nodes, head_dim)
    return attention.out_proj(out.transpose(1, 2).reshape(rows, nodes, -1))


def _short_conv(conv, normed, state, taps) -> torch.Tensor:
    """LFM2's gated short convolution for the nodes, each over its own ancestors and the prompt's conv state."""
    gate_in, gate_out, values = conv.in_proj(normed).chunk(3, dim=-1)
    inputs = torch.cat([state.transpose(1, 2).to(values.dtype), gate_in * values], dim=1)  # (rows, kernel + nodes, h)
    weight = conv.conv.weight[:, 0, :]  # (hidden, kernel), depthwise
    mixed = sum(inputs[:, taps[:, tap]] * weight[:, tap] for tap in range(weight.shape[1]))
    if conv.conv.bias is not None:
        mixed = mixed + conv.conv.bias
    return conv.out_proj(gate_out * mixed)


def _edge_log_probs(head, hidden, tree: AnswerTree, max_logits: int) -> torch.Tensor:
    """(rows, edges + 1): log p(token | node) of every edge, the last column 0 for the answers' padding."""
    rows, nodes, _ = hidden.shape
    device = hidden.device
    edge_node, edge_token = tree.edge_node.to(device), tree.edge_token.to(device)
    out = torch.zeros((rows, len(edge_node) + 1), dtype=torch.float32, device=device)
    step = max(1, max_logits // (rows * head.weight.shape[0]))
    for start in range(0, nodes, step):
        logits = head(hidden[:, start : start + step]).float()
        low, high = torch.searchsorted(edge_node, torch.tensor([start, start + step], device=device)).tolist()
        local = edge_node[low:high] - start
        out[:, low:high] = logits[:, local, edge_token[low:high]] - torch.logsumexp(logits, dim=-1)[:, local]
    return out
