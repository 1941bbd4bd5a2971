"""The collaborative attention runtime (issue 15) against the reference formulas.

- nn.collaborative_attention (one product for all heads, one shared key head, grouped
  values) equals scores + biases + masks + softmax + values written out head by head, for
  boolean and additive masks, causal, cross-attention, position biases and grouped values;
  a query that sees no key gets zeros, as torch SDPA gives;
- with ``mixing`` the kernel mixes the shared query block by block of batch elements (any block
  size) into the same result, writes token-major output, and copies no activations (profiler);
- CollaborativeAttention's query (one linear map, one multiply), cached mixing and cached key weight
  equal the concatenated reference, follow parameter changes, and train (gradients equal the reference's);
- CollaborativeRotaryAttention's combined mix-rotate-scale equals rotary_rotate(rotary_query_states)
  and the shared key equals rotary_rotate(collab_key), with and without autograd;
- the transformers adapters give the same outputs (and weights, eager) through the fast path
  as through transformers' own attention interface, for encoders, causal decoders with a
  cache, cross-attention and position biases, and a cached decoding step equals the forward.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from collabcompress.runtime.attention import (CollaborativeAttention, CollaborativeRotaryAttention, collaborative_attention,
                               collaborative_query_states, rotary_query_states, rotary_rotate)



@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _reference(query, key, value, mask=None, causal=False, bias=None):
    """Head by head: softmax(q_h k^T + bias_h + mask) v_{g(h)}; -inf for boolean and causal masks."""
    n_head, groups = query.shape[1], value.shape[1]
    key = key.reshape(key.shape[0], key.shape[-2], key.shape[-1])
    outs, probs = [], []
    for h in range(n_head):
        scores = query[:, h] @ key.transpose(-1, -2)  # (B, N, M)
        if bias is not None:
            scores = scores + bias.expand(-1, n_head, -1, -1)[:, h]
        if causal:
            scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1),
                                       float("-inf"))
        if mask is not None:
            m = mask.expand(mask.shape[0], n_head, *mask.shape[2:])[:, h]
            scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m
        p = torch.softmax(scores, -1)
        probs.append(p)
        outs.append(p @ value[:, h // (n_head // groups)])
    return torch.stack(outs, 1), torch.stack(probs, 1)


CASES = ["plain", "bool", "additive", "causal", "causal+bool", "cross", "bias+additive", "bias+causal",
         "bias+bool+causal"]


def _case(case: str, groups: int, seed: int = 0):
    """(query, key, value, mask, causal, bias) of a small attention case: 4 query heads, one key head."""
    g = torch.Generator().manual_seed(seed)
    n, m = (5, 8) if case == "cross" else (6, 6)
    query, key = torch.randn(2, 4, n, 7, generator=g), torch.randn(2, 1, m, 7, generator=g)
    value = torch.randn(2, groups, m, 3, generator=g)
    mask = None
    if "bool" in case:
        mask = torch.ones(2, 1, 1, m, dtype=torch.bool)
        mask[1, ..., -2:] = False
    elif "additive" in case:
        mask = torch.zeros(2, 1, n, m)
        mask[0, :, :, :2] = -1e9
    bias = torch.randn(1, 4, n, m, generator=g) if "bias" in case else None
    return query, key, value, mask, "causal" in case, bias


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("groups", [4, 2, 1])
def test_kernel_equals_head_by_head_reference(float64, case, groups):
    query, key, value, mask, causal, bias = _case(case, groups)
    out, weights = collaborative_attention(query, key, value, attention_mask=mask, is_causal=causal,
                                           position_bias=bias)
    want, probs = _reference(query, key, value, mask, causal, bias)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(weights, probs, rtol=1e-10, atol=1e-10)
    flat, _ = collaborative_attention(query, key[:, 0], value, attention_mask=mask, is_causal=causal,
                                      position_bias=bias)  # (B, M, K) key, same result
    torch.testing.assert_close(flat, want, rtol=1e-12, atol=1e-12)


def test_a_query_that_sees_no_key_gets_zeros_as_sdpa_gives(float64):
    g = torch.Generator().manual_seed(1)
    query, key, value = torch.randn(1, 2, 3, 4, generator=g), torch.randn(1, 1, 3, 4, generator=g), \
        torch.randn(1, 2, 3, 5, generator=g)
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    mask[..., 0, :] = False  # the first query sees nothing (left padding under a causal mask)
    out, _ = collaborative_attention(query, key, value, attention_mask=mask)
    sdpa = F.scaled_dot_product_attention(query, key.expand(-1, 2, -1, -1), value, attn_mask=mask, scale=1.0)
    assert torch.equal(out[..., 0, :], torch.zeros_like(out[..., 0, :]))
    torch.testing.assert_close(out, sdpa, rtol=1e-10, atol=1e-10)


def _shared_case(case: str, groups: int, n_query: int, batch: int = 3, seed: int = 2):
    """(shared query (B, N, R), mixing (H, K), full query (B, H, N, K) written out, key, value, mask, causal, bias):
    4 heads, R = 5 shared query columns and K - R = 2 constant ones; values strided as a projection's view."""
    g = torch.Generator().manual_seed(seed)
    n_key = n_query + 3
    shared, mixing = torch.randn(batch, n_query, 5, generator=g), torch.randn(4, 7, generator=g)
    full = torch.cat([shared.unsqueeze(1) * mixing[:, None, :5],
                      mixing[:, None, 5:].expand(batch, -1, n_query, -1)], -1)
    key = torch.randn(batch, 1, n_key, 7, generator=g)
    value = torch.randn(batch, n_key, groups, 3, generator=g).transpose(1, 2)  # (B, G, M, d), not contiguous
    mask = bias = None
    if "bool" in case:
        mask = torch.ones(batch, 1, 1, n_key, dtype=torch.bool)
        mask[1, ..., -2:] = False
    if "additive" in case:
        mask = torch.zeros(batch, 1, n_query, n_key)
        mask[0, :, :, -2:] = -1e9
    if "bias" in case:
        bias = torch.randn(1, 4, n_query, n_key, generator=g)
    return shared, mixing, full, key, value, mask, "causal" in case, bias


@pytest.mark.parametrize("block", ["one element", "two elements", "default"])
@pytest.mark.parametrize("case", ["plain", "bool+causal", "bias+additive"])
@pytest.mark.parametrize("groups,n_query", [(4, 6), (2, 6), (2, 1), (1, 1)])
def test_kernel_mixes_the_shared_query_block_by_block(float64, monkeypatch, block, case, groups, n_query):
    """With ``mixing`` the heads' queries are never stored whole: blocks of one, two (3 = 2 + 1)
    or all batch elements give the reference, the output is token-major memory, and the
    weights are those of the written-out query; N = 1 is a decoding step."""
    import collabcompress.runtime.attention as cnn

    shared, mixing, full, key, value, mask, causal, bias = _shared_case(case, groups, n_query)
    per_element = 4 * n_query * (7 + key.shape[-2]) * 8
    sizes = {"one element": 1, "two elements": 2 * per_element, "default": cnn._BLOCK_BYTES}
    monkeypatch.setattr(cnn, "_BLOCK_BYTES", sizes[block])
    want, probs = _reference(full, key, value, mask, causal, bias)
    for need_weights in (True, False):
        out, weights = collaborative_attention(shared, key, value, mixing=mixing, attention_mask=mask,
                                               is_causal=causal, position_bias=bias, need_weights=need_weights)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
        assert out.transpose(1, 2).is_contiguous()  # (B, N, H, d) in memory: the adapters reshape it for free
        if need_weights:
            torch.testing.assert_close(weights, probs, rtol=1e-10, atol=1e-10)
        else:
            assert weights is None


def test_kernel_copies_no_activations():
    """The inference kernel reads strided values and writes token-major output: besides the
    constant query columns (H x N x (K - R) numbers, once per call) nothing is copied."""
    batch, n_query, n_head, width, shared, d_v = 2, 16, 4, 10, 8, 6
    g = torch.Generator().manual_seed(3)
    query, mixing = torch.randn(batch, n_query, shared, generator=g), torch.randn(n_head, width, generator=g)
    key = torch.randn(batch, 1, n_query, width, generator=g)
    value = torch.randn(batch, n_query, n_head * d_v, generator=g).view(batch, n_query, n_head, d_v).transpose(1, 2)
    mask = torch.ones(batch, 1, 1, n_query, dtype=torch.bool)
    with torch.inference_mode(), torch.profiler.profile() as prof:
        out, _ = collaborative_attention(query, key, value, mixing=mixing, attention_mask=mask, need_weights=False)
    ops = {e.key: e.count for e in prof.key_averages()}
    assert not {"aten::clone", "aten::contiguous", "aten::cat", "aten::_to_copy"} & set(ops)
    assert ops.get("aten::copy_", 0) <= 1
    assert out.transpose(1, 2).reshape(batch, n_query, -1).data_ptr() == out.data_ptr()


def test_module_query_mixing_is_cached_and_follows_the_parameters(float64):
    module, tensors = _module()
    assert module.query_mixing().requires_grad  # training the mixing: built in the graph, not cached
    with torch.no_grad():
        first = module.query_mixing()
        assert module.query_mixing() is first
        torch.testing.assert_close(first, 0.4 * torch.cat([tensors[2], torch.eye(3)], -1))
        module.collab_mixing.mul_(2.0)
        module.scale = 0.5
        torch.testing.assert_close(module.query_mixing(), 0.5 * torch.cat([2.0 * tensors[2], torch.eye(3)], -1))


def _module(seed=0, d_model=12, n_head=3, shared_dim=6, scale=0.4):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(shared_dim, d_model, generator=g), torch.randn(shared_dim, d_model, generator=g),
               torch.randn(n_head, shared_dim, generator=g), torch.randn(n_head, d_model, generator=g)]
    return CollaborativeAttention.from_tensors(*tensors, scale), tensors


def _reference_module_output(tensors, scale, x, v):
    query, key, mixing, content = tensors
    q = torch.cat([(x @ query.T).unsqueeze(1) * mixing.unsqueeze(1),
                   torch.eye(len(mixing)).unsqueeze(1).expand(x.shape[0], -1, x.shape[1], -1)], -1)
    k = torch.cat([x @ key.T, x @ content.T], -1).unsqueeze(1)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def test_query_equals_concatenation_and_the_key_weight_follows_the_parameters(float64):
    module, tensors = _module()
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(2))
    v = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        q = collaborative_query_states(x, tensors[0], tensors[2], 0.4)
        torch.testing.assert_close(q, 0.4 * torch.cat([(x @ tensors[0].T).unsqueeze(1) * tensors[2].unsqueeze(1),
                                                       torch.eye(3).unsqueeze(1).expand(2, -1, 5, -1)], -1))
        torch.testing.assert_close(module(x, v)[0], _reference_module_output(tensors, 0.4, x, v))
        module.collab_content_bias.weight.mul_(-2.0)  # in place: the cached [V^T ; C] must be rebuilt
        module.collab_key.load_state_dict({"weight": 3.0 * tensors[1]})
    changed = [tensors[0], 3.0 * tensors[1], tensors[2], -2.0 * tensors[3]]
    with torch.no_grad():
        torch.testing.assert_close(module(x, v)[0], _reference_module_output(changed, 0.4, x, v))


def test_module_trains_with_the_reference_gradients(float64):
    module, tensors = _module(seed=4)
    module.train()
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(5))
    v = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(6))
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    mask[0, ..., -1] = False
    out, _ = module(x, v, attention_mask=mask, is_causal=True)
    out.square().sum().backward()
    leaves = [t.clone().requires_grad_() for t in tensors]
    query, key, mixing, content = leaves
    q = torch.cat([(x @ query.T).unsqueeze(1) * mixing.unsqueeze(1),
                   torch.eye(3).unsqueeze(1).expand(2, -1, 5, -1)], -1)
    k = torch.cat([x @ key.T, x @ content.T], -1).unsqueeze(1)
    want, _ = _reference(0.4 * q, k, v, mask, causal=True)
    want.square().sum().backward()
    grads = [module.collab_query.weight.grad, module.collab_key.weight.grad, module.collab_mixing.grad,
             module.collab_content_bias.weight.grad]
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-9, atol=1e-9)


def _rotary(seed=0, d_model=16, kv_heads=2, shared_dim=10, head_dim=8):
    module = CollaborativeRotaryAttention(d_model, kv_heads, shared_dim, key_bias=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.collab_key.weight.copy_(torch.randn(shared_dim, d_model, generator=g))
        module.collab_key.bias.copy_(torch.randn(shared_dim, generator=g))
        module.collab_mixing.copy_(torch.randn(kv_heads, shared_dim // 2, 2, generator=g))
        module.collab_key_freq.copy_(torch.randint(0, head_dim // 2, (shared_dim // 2,), generator=g).sort().values)
    return module


def _cos_sin(batch, n, head_dim, seed=7):
    angles = torch.rand(batch, n, head_dim // 2, generator=torch.Generator().manual_seed(seed)) * 6.0
    return torch.cat([angles.cos(), angles.cos()], -1), torch.cat([angles.sin(), angles.sin()], -1)  # (B, N, d)


@pytest.mark.parametrize("grad", [False, True])
def test_rotary_states_equal_the_reference(float64, grad):
    module = _rotary()
    g = torch.Generator().manual_seed(8)
    query = torch.randn(2, 5, 4, 8, generator=g).transpose(1, 2)  # (B, H, N, d), strided as q_proj's view
    y = torch.randn(2, 5, 16, generator=g)
    cos, sin = _cos_sin(2, 5, 8)
    freq = module.collab_key_freq
    with torch.set_grad_enabled(grad):
        got_q = module.query_states(query.requires_grad_(grad), cos, sin, 0.3)
        got_k = module.key_states(y, cos, sin)
    want_q = 0.3 * rotary_rotate(rotary_query_states(query, module.collab_mixing, freq), cos, sin, freq)
    want_k = rotary_rotate(module.collab_key(y).unsqueeze(1), cos, sin, freq)
    torch.testing.assert_close(got_q, want_q, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_k, want_k, rtol=1e-10, atol=1e-10)
    assert got_q.requires_grad == grad
    with torch.no_grad():  # a new collab_key_freq (loading) is followed
        module.collab_key_freq.copy_(freq.flip(0))
        torch.testing.assert_close(module.key_states(y, cos, sin),
                                   rotary_rotate(module.collab_key(y).unsqueeze(1), cos, sin, freq))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("groups", [4, 2])
def test_fused_sdpa_path_equals_the_reference(float64, case, groups):
    """The SDPA path that CUDA float32 takes without weights, run here on the CPU: one mask for
    bias, mask and causality, grouped values repeated."""
    from collabcompress.runtime.attention import _fused

    query, key, value, mask, causal, bias = _case(case, groups, seed=1)
    got = _fused(query, key, value, mask, causal, bias, 0.0)
    want, _ = _reference(query, key, value, mask, causal, bias)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_sdpa_path_pads_half_precision_widths(dtype):
    """Width 7 is padded with zeros to 8 in half precision: the same scores, so the same output."""
    from collabcompress.runtime.attention import _fused

    query, key, value, mask, causal, bias = _case("bias+bool+causal", 2, seed=3)
    got = _fused(query.to(dtype), key.to(dtype), value.to(dtype), mask, causal, bias.to(dtype), 0.0)
    want, _ = _reference(query, key, value, mask, causal, bias)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)



def _spy_fused(monkeypatch) -> list[tuple]:
    """Record the shapes of the queries and values collaborative_attention hands to torch SDPA."""
    import collabcompress.runtime.attention as cnn

    calls, fused = [], cnn._fused
    monkeypatch.setattr(cnn, "_fused", lambda q, k, v, *rest: calls.append((q.shape, v.shape)) or fused(q, k, v, *rest))
    return calls


@pytest.mark.parametrize("groups", [4, 2, 1])
@pytest.mark.parametrize("width,d_v", [(7, 4), (6, 6), (3, 5)])  # keys wider than, as wide as, narrower than values
@pytest.mark.parametrize("mixed", [False, True])
def test_causal_prefill_runs_sdpa_flash_on_the_cpu(monkeypatch, groups, width, d_v, mixed):
    """A causal prefill without other masks and K <= 2 d_v runs torch SDPA's fused CPU kernel, the narrower
    side zero-padded: the reference's output and, with autograd, its gradients (float32: the kernel's dtypes)."""
    calls = _spy_fused(monkeypatch)
    g = torch.Generator().manual_seed(4)
    query, key = torch.randn(2, 4, 9, width, generator=g), torch.randn(2, 1, 9, width, generator=g)
    value = torch.randn(2, groups, 9, d_v, generator=g)
    mixing = torch.randn(4, width, generator=g) if mixed else None
    shared = query[:, 0] if mixed else query  # (B, N, K): mixed per head by ``mixing``
    full = shared.unsqueeze(1) * mixing[:, None] if mixed else query
    want, _ = _reference(full, key, value, causal=True)
    out, weights = collaborative_attention(shared, key, value, mixing=mixing, is_causal=True, need_weights=False)
    assert weights is None and calls == [((2, 4, 9, width), (2, groups, 9, d_v))]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    leaves = [t.clone().requires_grad_() for t in (shared, key, value)]
    out, _ = collaborative_attention(*leaves, mixing=mixing, is_causal=True, need_weights=False)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    ref = [t.clone().requires_grad_() for t in (shared, key, value)]
    full = ref[0].unsqueeze(1) * mixing[:, None] if mixed else ref[0]
    want_grads = torch.autograd.grad(_reference(full, ref[1], ref[2], causal=True)[0].square().sum(), ref)
    assert len(calls) == 2
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["wide keys", "mask", "bias", "decoding step", "weights", "not causal", "float64"])
def test_other_cpu_attention_keeps_the_product(monkeypatch, case):
    """Keys wider than twice the values, any mask or bias, a one-token step, weights asked for, no causality
    or a dtype the kernel lacks: the product path (the reference's output either way)."""
    calls = _spy_fused(monkeypatch)
    g = torch.Generator().manual_seed(5)
    n_query = 1 if case == "decoding step" else 6
    dtype = torch.float64 if case == "float64" else torch.float32
    width = 9 if case == "wide keys" else 6
    query, key = torch.randn(1, 4, n_query, width, generator=g), torch.randn(1, 1, 6, width, generator=g)
    value = torch.randn(1, 2, 6, 4, generator=g)
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    mask = torch.ones(1, 1, 1, 6, dtype=torch.bool) if case == "mask" else None
    bias = torch.randn(1, 4, n_query, 6, generator=g, dtype=dtype) if case == "bias" else None
    causal = case != "not causal"
    out, _ = collaborative_attention(query, key, value, attention_mask=mask, is_causal=causal, position_bias=bias,
                                     need_weights=case == "weights")
    assert calls == []
    torch.testing.assert_close(out, _reference(query, key, value, mask, causal, bias)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("need_weights", [True, False])  # False: torch SDPA's fused kernel
@pytest.mark.parametrize("case", ["plain", "bool", "causal", "bias+additive", "bias+bool+causal"])
def test_kernel_on_cuda_equals_the_reference(case, need_weights):
    """The kernel on a GPU (float32): equal to the head-by-head reference there and to the CPU."""
    g = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 12, 64, 204, generator=g) / 204 ** 0.5, torch.randn(2, 1, 64, 204, generator=g)
    value = torch.randn(2, 12, 64, 32, generator=g)
    mask = bias = None
    if "bool" in case:
        mask = torch.ones(2, 1, 1, 64, dtype=torch.bool)
        mask[1, ..., -5:] = False
    if "bias" in case:
        bias = torch.randn(1, 12, 64, 64, generator=g)
        mask = mask if mask is not None else torch.zeros(2, 1, 64, 64)
    cuda = [None if t is None else t.cuda() for t in (query, key, value, mask, bias)]
    out, weights = collaborative_attention(cuda[0], cuda[1], cuda[2], attention_mask=cuda[3],
                                           is_causal="causal" in case, position_bias=cuda[4],
                                           need_weights=need_weights)
    assert (weights is None) != need_weights
    want, _ = _reference(*cuda[:4], "causal" in case, cuda[4])
    assert out.device.type == "cuda"
    # the fused kernel sums in another order: float32 rounding (seen on an H200: 2e-5 at most)
    tol = {"rtol": 1e-4, "atol": 1e-5} if need_weights else {"rtol": 1e-3, "atol": 1e-4}
    torch.testing.assert_close(out, want, **tol)
    on_cpu, _ = collaborative_attention(query, key, value, attention_mask=mask, is_causal="causal" in case,
                                        position_bias=bias)
    torch.testing.assert_close(out.cpu(), on_cpu, **tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("need_weights", [True, False])  # False: the mixed query goes to torch SDPA
def test_shared_query_with_mixing_on_cuda(need_weights):
    shared, mixing, full, key, value, mask, causal, bias = _shared_case("bias+bool+causal", 2, 6)
    out, _ = collaborative_attention(shared.cuda(), key.cuda(), value.cuda(), mixing=mixing.cuda(),
                                     attention_mask=mask.cuda(), is_causal=causal, position_bias=bias.cuda(),
                                     need_weights=need_weights)
    want, _ = _reference(full, key, value, mask, causal, bias)
    torch.testing.assert_close(out.cpu(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("need_weights", [True, False])  # False: SDPA with the width padded to 208
def test_half_precision_kernel_on_cuda(dtype, need_weights):
    g = torch.Generator().manual_seed(4)
    query, key = torch.randn(2, 12, 64, 204, generator=g) / 204 ** 0.5, torch.randn(2, 1, 64, 204, generator=g)
    value, bias = torch.randn(2, 12, 64, 32, generator=g), torch.randn(1, 12, 64, 64, generator=g)
    out, _ = collaborative_attention(*(t.cuda().to(dtype) for t in (query, key, value)), is_causal=True,
                                     position_bias=bias.cuda().to(dtype), need_weights=need_weights)
    want, _ = _reference(query, key, value, None, True, bias)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float().cpu(), want, rtol=0.05, atol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rotary_states_on_cuda_equal_the_cpu():
    module = _rotary()
    g = torch.Generator().manual_seed(8)
    query = torch.randn(2, 5, 4, 8, generator=g).transpose(1, 2)
    y = torch.randn(2, 5, 16, generator=g)
    cos, sin = _cos_sin(2, 5, 8)
    want_q, want_k = module.query_states(query, cos, sin, 0.3), module.key_states(y, cos, sin)
    module.cuda()
    got_q = module.query_states(query.cuda(), cos.cuda(), sin.cuda(), 0.3)
    got_k = module.key_states(y.cuda(), cos.cuda(), sin.cuda())
    torch.testing.assert_close(got_q.cpu(), want_q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_k.cpu(), want_k, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- transformers adapters

transformers = pytest.importorskip("transformers")

from collabcompress import hf  # noqa: E402
from collabcompress.runtime import adapters  # noqa: E402
from collabcompress.commands.compress import CompressOptions, compress  # noqa: E402
from families import make_checkpoint  # noqa: E402

FAMILIES = ["bert", "gpt2", "t5", "bart"]  # MPNet computes its attention itself: test_hf checks it


@pytest.fixture(scope="module")
def compressed(tmp_path_factory) -> dict[str, Path]:
    transformers.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("runtime")
    out = {}
    for name in FAMILIES:
        out[name] = root / f"{name}-low"
        compress(make_checkpoint(name, root / name), out[name], CompressOptions(rank=6, max_iter=3))
    return out


def _inputs(name):
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(3, 60, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    kw = {"input_ids": ids, "attention_mask": mask}
    if name in ("t5", "bart"):
        kw["decoder_input_ids"] = ids[:, :5]
    return kw


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", FAMILIES)
def test_fast_path_equals_transformers_interface(compressed, name, attn, monkeypatch):
    model = hf.from_pretrained(compressed[name], attn_implementation=attn)
    kw = _inputs(name)
    with torch.no_grad():
        fast = model(**kw, output_attentions=attn == "eager")
        monkeypatch.setattr(adapters._Adapter, "_fast", False)
        slow = model(**kw, output_attentions=attn == "eager")
    torch.testing.assert_close(fast.last_hidden_state, slow.last_hidden_state, rtol=1e-5, atol=1e-5)
    if attn == "eager":
        names = [k for k in ("attentions", "decoder_attentions", "cross_attentions") if getattr(fast, k, None)]
        assert names
        for k in names:
            for a, b in zip(getattr(fast, k), getattr(slow, k)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cached_decoding_step_equals_the_forward(compressed, attn):
    model = hf.from_pretrained(compressed["gpt2"], attn_implementation=attn)
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        full = model(input_ids=ids).last_hidden_state
        cache = transformers.DynamicCache(config=model.config)
        model(input_ids=ids[:, :8], **{adapters.cache_keyword(model): cache}, use_cache=True)
        step = model(input_ids=ids[:, 8:], **{adapters.cache_keyword(model): cache}, use_cache=True).last_hidden_state
    torch.testing.assert_close(step[:, 0], full[:, 8], rtol=1e-5, atol=1e-5)
