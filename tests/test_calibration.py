"""calibrate, the whitened decomposition, refinement, and their bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from collabcompress.files.statistics import STATS_FORMAT
from collabcompress.commands.compress import CompressOptions, compress
from collabcompress.files.output import write_safetensors

from families import quiet_transformers
from helpers import write_stats

pytest.importorskip("transformers")


# The real `calibrate` run (12 Lee documents, 128-token windows, 4 kept sequences) is made once
# per session (conftest.py); checks of compress's own refusals use synthetic statistics.

@pytest.fixture(scope="module")
def texts(minilm_calibration) -> Path:
    return minilm_calibration[0]


@pytest.fixture(scope="module")
def stats(minilm_calibration) -> Path:
    return minilm_calibration[1]


def test_statistics_file_contents(stats, minilm_dir, texts, minilm_calibration):
    summary = minilm_calibration[2]
    assert summary["texts"] == 12 and summary["tokens"] > 2000 and summary["kept_sequences"] == 4
    with safe_open(str(stats), "pt") as f:
        meta = f.metadata()
        assert meta["format"] == STATS_FORMAT
        assert meta["texts_sha256"] == hashlib.sha256(texts.read_bytes()).hexdigest()
        for i in range(6):
            m = f"encoder.layer.{i}.attention.self"
            second, mean = f.get_tensor(f"{m}.second_moment"), f.get_tensor(f"{m}.mean")
            assert second.shape == (384, 384) and mean.shape == (384,)
            assert torch.allclose(second, second.T)
            assert torch.linalg.eigvalsh(second - torch.outer(mean, mean)).min() > -1e-8
            assert f.get_tensor(f"{m}.sequences").shape[0] == 4
    # LayerNorm outputs: per-token mean over features ~ beta's mean, so the moments are of real scale
    assert 0.01 < float(second.diagonal().mean()) < 100


def test_value_moments_leave_out_padding_queries(stats, minilm_dir, texts):
    """Padded windows (texts of different lengths): the attention-weighted moments count only
    the real queries' rows, as the rows z_h = P_h y written out and masked give them."""
    from transformers import AutoModel

    from collabcompress.commands.calibrate import windows
    from collabcompress.files.checkpoint import read_texts
    from collabcompress.files.texts import load_tokenizer

    tokenizer = load_tokenizer([minilm_dir])
    with quiet_transformers():
        model = AutoModel.from_pretrained(str(minilm_dir), attn_implementation="eager").eval()
    seen = {}
    layer = model.encoder.layer[2].attention.self
    handle = layer.query.register_forward_pre_hook(lambda _m, args: seen.__setitem__("y", args[0]))
    second, total, count, padded = 0.0, 0.0, 0, False
    try:
        with torch.no_grad():
            for _, ids, mask in windows(tokenizer, read_texts(texts), 128, 16, 100_000):
                padded |= not bool(mask.all())
                probs = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions[2].double()
                z = (probs @ seen["y"].double()[:, None]).transpose(1, 2)[mask.bool()]  # (n, H, D): real queries
                second, total = second + torch.einsum("nhi,nhj->ij", z, z), total + z.sum((0, 1))
                count += z.shape[0]
    finally:
        handle.remove()
    assert padded
    with safe_open(str(stats), "pt") as f:
        m = "encoder.layer.2.attention.self"
        assert torch.allclose(f.get_tensor(f"{m}.value_second_moment"), second / count, rtol=1e-5, atol=1e-7)
        assert torch.allclose(f.get_tensor(f"{m}.value_mean"), total / count, rtol=1e-5, atol=1e-7)


@pytest.mark.filterwarnings("ignore:calibration statistics from only")
def test_calibrated_compress_lowers_the_data_metric(stats, minilm_dir, tmp_path, cli):
    # one of the six layers: each layer's fit uses only its own statistics
    plain = compress(minilm_dir, tmp_path / "plain", CompressOptions(rank=96, max_iter=10, layers="3"))
    calibrated = compress(minilm_dir, tmp_path / "cal", CompressOptions(rank=96, max_iter=10, layers="3",
                                                                        calibration=str(stats)))
    assert calibrated["settings"]["calibration"]["sha256"] == hashlib.sha256(stats.read_bytes()).hexdigest()
    kl = {}
    for name in ("plain", "cal"):
        result = cli("verify", tmp_path / name, "--calibration", stats, "--json", "-")
        assert result.exit_code == 0, result.stderr
        kl[name] = json.loads(result.stdout)["overall"]["kl_mean"]
    assert kl["cal"] < kl["plain"]  # measured: 0.11 against 0.29
    assert plain["settings"]["calibration"] is None


@pytest.mark.filterwarnings("ignore:calibration statistics from only")
def test_refinement_never_worsens_and_is_deterministic(stats, minilm_dir, tmp_path):
    opts = CompressOptions(rank=64, max_iter=5, calibration=str(stats), refine_steps=5, layers="0")
    a = compress(minilm_dir, tmp_path / "a", opts)
    compress(minilm_dir, tmp_path / "b", opts)
    refine = a["layers"][0]["refine"]
    assert refine["steps"] == 5 and refine["kl_after"] <= refine["kl_before"]
    assert 0 < a["layers"][0]["relative_error"] and 0 < a["layers"][0]["relative_error_plain"] < 1.5
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_statistics_from_another_model_refused(stats, sample_dir, tmp_path, cli):
    result = cli("compress", sample_dir, "--out", tmp_path / "out", "--rank", "96", "--calibration", stats)
    assert result.exit_code == 3
    assert "another model" in result.stderr
    assert not (tmp_path / "out").exists()


def test_statistics_with_wrong_shapes_refused(stats, minilm_dir, tmp_path, cli):
    with safe_open(str(stats), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["encoder.layer.2.attention.self.second_moment"] = torch.zeros(128, 128, dtype=torch.float64)
    bad = tmp_path / "bad.safetensors"
    write_safetensors(bad, [(k, tuple(t.shape), t.dtype, lambda t=t: t) for k, t in tensors.items()], meta)
    result = cli("compress", minilm_dir, "--out", tmp_path / "out", "--rank", "96", "--calibration", bad)
    assert result.exit_code == 3
    assert "encoder.layer.2.attention.self.second_moment" in result.stderr and "[128, 128]" in result.stderr


def test_refine_needs_kept_sequences(minilm_dir, tmp_path, cli):
    result = cli("compress", minilm_dir, "--out", tmp_path / "out", "--rank", "96", "--refine-steps", "3")
    assert result.exit_code == 3 and "--calibration" in result.stderr
    no_seq = write_stats(minilm_dir, tmp_path / "noseq.safetensors", 500)  # no kept sequences, few tokens
    result = cli("compress", minilm_dir, "--out", tmp_path / "out", "--rank", "96", "--refine-steps", "3",
                 "--calibration", no_seq)
    assert result.exit_code == 3 and "--keep-sequences" in result.stderr
    # few tokens: a warning, not an error
    result = cli("compress", minilm_dir, "--out", tmp_path / "out2", "--rank", "96", "--max-iter", "2",
                 "--layers", "0", "--calibration", no_seq)
    assert result.exit_code == 0
    assert "warning:" in result.stderr and "tokens" in result.stderr


@pytest.mark.parametrize("content,message", [(b"", "holds no text"), (b"\n  \n", "holds no text"),
                                             (b"caf\xe9 au lait\n", "not UTF-8")])
def test_bad_texts_file(minilm_dir, tmp_path, cli, content, message):
    texts = tmp_path / "texts.txt"
    texts.write_bytes(content)
    result = cli("calibrate", minilm_dir, "--texts", texts, "--out", tmp_path / "s.safetensors")
    assert result.exit_code == 3
    assert message in result.stderr
    assert not (tmp_path / "s.safetensors").exists()


def test_not_a_statistics_file(minilm_dir, sample_dir, tmp_path, cli):
    result = cli("compress", minilm_dir, "--out", tmp_path / "out", "--rank", "96", "--calibration",
                 sample_dir / "model.safetensors")
    assert result.exit_code == 3 and "not a calibration statistics file" in result.stderr


def test_kept_sequences_come_from_the_texts_used(minilm_dir, texts, tmp_path, cli):
    out = tmp_path / "s.safetensors"
    result = cli("calibrate", minilm_dir, "--texts", texts, "--out", out, "--max-tokens", "300",
                 "--batch-size", "4", "--keep-sequences", "3", "--json", "-")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["texts"] < 12 and summary["kept_sequences"] == 3
    with safe_open(str(out), "pt") as f:
        assert f.get_tensor("encoder.layer.0.attention.self.sequences").shape[0] == 3


def test_long_texts_are_split_into_windows_not_truncated(minilm_dir):
    from collabcompress.commands.calibrate import windows
    from collabcompress.files.texts import load_tokenizer

    tok = load_tokenizer([minilm_dir])
    long_text = " ".join(f"word{i} is here" for i in range(120))
    texts = ["a short one", long_text, "another short text"]
    body = tok(long_text, add_special_tokens=False)["input_ids"]
    assert len(body) > 3 * 30  # several windows of 32 tokens
    rows = [(int(o), [t for t, m in zip(ids.tolist(), mask.tolist()) if m])
            for owners, ids, masks in windows(tok, texts, 32, 2) for o, ids, mask in zip(owners, ids, masks)]
    assert all(len(r) <= 32 and r[0] == tok.cls_token_id and r[-1] == tok.sep_token_id for _, r in rows)
    assert [o for o, _ in rows] == sorted(o for o, _ in rows) and {o for o, _ in rows} == {0, 1, 2}
    # the long text's windows hold every one of its tokens, in order
    assert [t for o, r in rows if o == 1 for t in r[1:-1]] == body
    batches = list(windows(tok, texts, 32, 2))
    assert all(ids.shape[0] <= 2 and ids.shape == masks.shape for _, ids, masks in batches)
    assert all(bool(masks.any(0).all()) for _, _, masks in batches)  # no all-padding columns


def test_calibrate_uses_every_token_of_long_texts(minilm_dir, minilm_calibration):
    from collabcompress.files.texts import load_tokenizer

    texts, out, summary = minilm_calibration
    tok = load_tokenizer([minilm_dir])
    lines = texts.read_text(encoding="utf-8").splitlines()
    body = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in lines]
    per_window = 128 - 2
    expected_windows = sum(-(-n // per_window) for n in body)
    assert max(body) > per_window  # some texts need several windows
    assert summary["windows"] == expected_windows and summary["texts"] == len(lines) and summary["max_length"] == 128
    assert summary["tokens"] == sum(body) + 2 * expected_windows
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["windows"] == str(expected_windows) and f.metadata()["max_length"] == "128"


def test_max_length_without_room_for_text_refused(minilm_dir, texts, tmp_path, cli):
    out = tmp_path / "s.safetensors"
    result = cli("calibrate", minilm_dir, "--texts", texts, "--out", out, "--max-length", "2")
    assert result.exit_code == 3 and "special tokens" in result.stderr and not out.exists()


def test_tokenizer_without_overflow_truncates_with_a_warning(minilm_dir):
    from collabcompress.commands.calibrate import windows
    from collabcompress.files.texts import load_tokenizer

    tok = load_tokenizer([minilm_dir])

    def no_overflow(texts, **kw):
        if kw.get("return_overflowing_tokens"):
            raise NotImplementedError("return_overflowing_tokens")
        return tok(texts, **kw)

    long_text = " ".join(["words"] * 100)
    with pytest.warns(UserWarning, match="truncated"):
        rows = list(windows(no_overflow, [long_text, "short"], 16, 4))
    (owners, ids, mask), = rows
    assert owners.tolist() == [0, 1] and ids.shape == (2, 16) and int(mask[0].sum()) == 16


def test_max_length_capped_at_the_position_table(minilm_dir, texts, tmp_path, cli):
    out = tmp_path / "s.safetensors"
    result = cli("calibrate", minilm_dir, "--texts", texts, "--out", out, "--max-length", "100000",
                 "--max-tokens", "300", "--batch-size", "2", "--json", "-")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["max_length"] == 512  # MiniLM's 512 positions
