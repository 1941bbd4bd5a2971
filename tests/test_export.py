"""export --format stock: a compressed rotary decoder as a plain multi-query transformers model.

Tiny LLaMA, Mistral, Qwen2 (q/k/v biases), multi-head LLaMA and LLaMA with llama3, linear and
yarn rope (yarn: attention scaling 1.0693) at full width (R = r_v = G*d) must give the original's
logits in plain transformers (no collabcompress code) and the same greedy tokens; below full width,
the export must give the compressed model's logits (the stock form is exact, not only at full
width). What the stock form cannot hold is refused with exit 3 and nothing written.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from families import make_checkpoint, make_rotary_checkpoint  # noqa: E402
from helpers import assert_clean_failure, digest, run_cli, write_shards  # noqa: E402

from collabcompress import hf  # noqa: E402
from collabcompress.commands.compress import CompressOptions, compress  # noqa: E402
from collabcompress.commands.export import export  # noqa: E402

NAMES = ["llama", "llama-mha", "mistral", "qwen2", "llama-rope-linear", "llama-rope-llama3", "llama-rope-yarn"]
IDS = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(0))


def _full(src: Path) -> int:
    cfg = json.loads((src / "config.json").read_text())
    return cfg["num_key_value_heads"] * cfg["head_dim"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-src")
    return {name: make_rotary_checkpoint(name, root / name) for name in NAMES}


def _plain(directory: Path, caplog=None):
    with torch.no_grad():
        return transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


def _compress_export(src: Path, root: Path, rank: int, value_rank: int | None = None, **options) -> Path:
    compress(src, root / "c", CompressOptions(rank=rank, value_rank=value_rank or rank, force_data_free=True,
                                              **options), workers=1)
    export(root / "c", root / "e")
    return root / "e"


@pytest.mark.parametrize("name", NAMES)
def test_full_width_export_is_the_original_in_plain_transformers(sources, tmp_path, name, caplog):
    src = sources[name]
    with caplog.at_level(logging.WARNING):
        out = _compress_export(src, tmp_path, _full(src))
        model = _plain(out)
    assert not [r for r in caplog.records if "rope" in r.getMessage().lower()], caplog.text
    reference = _plain(src)
    with torch.no_grad():
        diff = (model(IDS).logits - reference(IDS).logits).abs().max()
        greedy = [m.generate(IDS[:, :8], max_new_tokens=16, do_sample=False) for m in (model, reference)]
    assert float(diff) <= 1e-4
    assert torch.equal(*greedy)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 1 and cfg["head_dim"] == _full(src)
    assert "collaborative_attention" not in cfg and "rope_scaling" not in cfg
    rope = cfg["rope_parameters"]
    assert rope["rope_type"] == "longrope" and rope["short_factor"] == rope["long_factor"]
    assert rope["factor"] == 1.0 and rope["attention_factor"] == 1.0
    assert rope["original_max_position_embeddings"] == cfg["max_position_embeddings"]
    assert len(rope["short_factor"]) == _full(src) // 2
    assert not (out / "collab_manifest.json").exists() and (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("name", ["llama", "qwen2", "llama-rope-yarn"])
def test_below_full_width_the_export_is_the_compressed_model(sources, tmp_path, name):
    out = _compress_export(sources[name], tmp_path, 8, stock=True)
    with torch.no_grad():
        plain = _plain(out)(IDS).logits
        ours = hf.from_pretrained(tmp_path / "c").float()(IDS).logits
    assert float((plain - ours).abs().max()) <= 1e-4
    assert json.loads((out / "config.json").read_text())["head_dim"] == 8


def test_export_manifest_records_the_source_files(sources, tmp_path):
    out = _compress_export(sources["llama"], tmp_path, 16)
    record = json.loads((out / "export_manifest.json").read_text())
    assert record["format"] == "collabcompress-export/1" and record["export_format"] == "stock"
    source = {f["name"]: f for f in record["source"]["files"]}
    collab = json.loads((tmp_path / "c" / "collab_manifest.json").read_text())
    assert {o["name"] for o in collab["outputs"]} | {"collab_manifest.json"} == set(source)
    assert all(len(f["sha256"]) == 64 for f in source.values())
    assert {o["name"] for o in record["outputs"]} >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert record["stock"]["head_dim"] == 16 and record["stock"]["kv_cache_per_token_and_layer"] == 32


def test_cli_export_and_force(sources, tmp_path):
    compress(sources["llama"], tmp_path / "c", CompressOptions(rank=8, value_rank=8, force_data_free=True), workers=1)
    ok = run_cli("export", tmp_path / "c", "--out", tmp_path / "e")
    assert ok.exit_code == 0, ok.stderr
    assert "KV cache 16 of 32" in ok.stdout
    assert_clean_failure(run_cli("export", tmp_path / "c", "--out", tmp_path / "e"), 3, "--force")
    again = run_cli("export", tmp_path / "c", "--out", tmp_path / "e", "--force", "--json", "-")
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["stock"]["head_dim"] == 8
    # --force replaces an earlier export, never a compress output (the one an export comes from, say)
    compress(sources["llama"], tmp_path / "c2", CompressOptions(rank=8, value_rank=8, force_data_free=True), workers=1)
    before = digest(tmp_path / "c2")
    assert_clean_failure(run_cli("export", tmp_path / "c", "--out", tmp_path / "c2", "--force"), 3,
                         "not an earlier export", "will not be replaced")
    assert digest(tmp_path / "c2") == before
    assert_clean_failure(run_cli("export", tmp_path / "c", "--out", tmp_path / "x", "--format", "gguf"), 3, "stock")
    assert_clean_failure(run_cli("export", tmp_path / "c", "--out", tmp_path / "c" / "inside"), 3, "input")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("case, options, needle", [
    ("no values", {"rank": 8}, "r_v = R"),
    ("r_v != R", {"rank": 8, "value_rank": 4}, "r_v = R"),
    ("one layer", {"rank": 8, "value_rank": 8, "layers": "0"}, "every layer"),
    ("frequency tables", {"rank": 4, "value_rank": 4}, "different frequency tables"),  # layers pick (1, 3), (2, 3)
])
def test_refuses_what_the_stock_form_cannot_hold(sources, tmp_path, case, options, needle):
    compress(sources["llama"], tmp_path / "c", CompressOptions(force_data_free=True, **options), workers=1)
    result = run_cli("export", tmp_path / "c", "--out", tmp_path / "e")
    assert_clean_failure(result, 3, needle, "compress --stock")
    assert not (tmp_path / "e").exists()


def test_refuses_different_widths_per_layer(sources, tmp_path):
    import dataclasses

    from collabcompress.commands.export import check_stock
    from collabcompress.errors import BadInputError
    from collabcompress.files.manifest import open_output

    compress(sources["llama"], tmp_path / "c", CompressOptions(rank=8, value_rank=8, force_data_free=True), workers=1)
    manifest, out = open_output(tmp_path / "c")
    try:
        first, second = manifest.layers
        mixed = dataclasses.replace(manifest, layers=(first, dataclasses.replace(second, shared_dim=4)))
        with pytest.raises(BadInputError, match="different key widths R per layer"):
            check_stock(mixed, out, out.config)
    finally:
        out.close()


def test_refuses_a_non_rotary_family(tmp_path):
    src = make_checkpoint("bert", tmp_path / "bert")
    compress(src, tmp_path / "c", CompressOptions(rank=8), workers=1)
    assert_clean_failure(run_cli("export", tmp_path / "c", "--out", tmp_path / "e"), 3, "bert", "rotary")
    assert not (tmp_path / "e").exists()


def test_stock_shares_one_frequency_table_and_exports(sources, tmp_path):
    from safetensors.torch import load_file

    manifest = compress(sources["llama"], tmp_path / "c", CompressOptions(rank=4, stock=True, force_data_free=True),
                        workers=1)
    tensors = load_file(str(tmp_path / "c" / "model.safetensors"))
    tables = [tensors[f"model.layers.{i}.self_attn.collab_key_freq"] for i in (0, 1)]
    assert torch.equal(*tables)  # a plain --rank 4 fit picks (1, 3) and (2, 3)
    assert all(la["value_rank"] == 4 for la in manifest["layers"])
    assert manifest["settings"]["stock"] is True and sum(manifest["settings"]["frequency_counts"]) == 2
    export(tmp_path / "c", tmp_path / "e")
    with torch.no_grad():
        plain = _plain(tmp_path / "e")(IDS).logits
        ours = hf.from_pretrained(tmp_path / "c").float()(IDS).logits
    assert float((plain - ours).abs().max()) <= 1e-4


@pytest.mark.parametrize("args, needle", [
    (["--energy", "0.9", "--force-data-free"], "--rank"),
    (["--rank", "8", "--value-rank", "4", "--force-data-free"], "r_v = R"),
    (["--rank", "8", "--layers", "0", "--force-data-free"], "--layers"),
    (["--rank", "8"], "--calibration"),
])
def test_stock_refusals(sources, tmp_path, args, needle):
    result = run_cli("compress", sources["llama"], "--out", tmp_path / "c", "--stock", *args)
    assert_clean_failure(result, 3, needle)
    assert not (tmp_path / "c").exists()


def test_stock_refuses_a_non_rotary_family(tmp_path):
    src = make_checkpoint("bert", tmp_path / "bert")
    result = run_cli("compress", src, "--out", tmp_path / "c", "--stock", "--rank", "8", "--force-data-free")
    assert_clean_failure(result, 3, "rotary decoder")


@pytest.mark.slow
@pytest.mark.real
def test_smollm2_full_width_export_is_the_original(smollm2_dir, tmp_path):
    """SmolLM2 at R = r_v = 192: plain transformers gives the original's logits and greedy tokens.

    Eager attention on both sides: SDPA's float32 kernel differs by about 1.3e-4 between head
    sizes 64 and 192, above the original's own float32 error (9e-5 against float64)."""
    from collabcompress.runtime.lm import token_ids
    from collabcompress.files.texts import load_tokenizer

    compress(smollm2_dir, tmp_path / "c", CompressOptions(rank=192, value_rank=192, force_data_free=True))
    export(tmp_path / "c", tmp_path / "e")
    tokenizer = load_tokenizer([smollm2_dir])
    ids = token_ids(tokenizer, "The quick brown fox jumps over the lazy dog. " * 20)[None, :209]  # (1, 209)
    models = [transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32,
                                                                attn_implementation="eager").eval()
              for d in (smollm2_dir, tmp_path / "e")]
    with torch.no_grad():
        logits = [m(ids).logits for m in models]
        greedy = [m.generate(ids[:, :20], max_new_tokens=8, do_sample=False) for m in models]  # stock cache path
    assert float((logits[0] - logits[1]).abs().max()) <= 1e-4
    assert torch.equal(*greedy)


def test_export_without_transformers_gives_the_install_hint(sources, tmp_path, monkeypatch):
    """The export is checked by building it in transformers: without the hf extra, the hint."""
    compress(sources["llama"], tmp_path / "c", CompressOptions(rank=8, stock=True, force_data_free=True), workers=1)
    monkeypatch.setitem(sys.modules, "transformers", None)
    result = run_cli("export", tmp_path / "c", "--out", tmp_path / "e")
    assert_clean_failure(result, 3, "pip install 'collabcompress[hf]'")
    assert not (tmp_path / "e").exists()


def test_a_sharded_source_exports_the_same_model(sources, tmp_path):
    """A source in two shards gives a sharded compress output; its export is the one model file
    of the single-file source's export, tensor for tensor."""
    single, sharded = sources["llama"], tmp_path / "sharded"
    shutil.copytree(single, sharded)
    tensors = load_file(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    write_shards(tensors, sharded, lambda name: ".layers.0." in name)
    for src in (single, sharded):
        (tmp_path / f"out-{src.name}").mkdir()
    exports = [_compress_export(src, tmp_path / f"out-{src.name}", 8, stock=True) for src in (single, sharded)]
    assert (tmp_path / "out-sharded" / "c" / "model.safetensors.index.json").is_file()
    a, b = (load_file(str(e / "model.safetensors")) for e in exports)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_evaluate_and_bench_take_an_export(sources, tmp_path):
    src = sources["llama"]
    compress(src, tmp_path / "c", CompressOptions(rank=8, stock=True, force_data_free=True), workers=1)
    export(tmp_path / "c", tmp_path / "e")
    texts = tmp_path / "texts.txt"
    texts.write_text("the cat sat on the mat and looked at the dog\n" * 20, encoding="utf-8")
    results = []
    for target in ("c", "e"):
        r = run_cli("evaluate", src, tmp_path / target, "--texts", texts, "--max-tokens", "64", "--window", "32",
                    "--prompts", "1", "--new-tokens", "4", "--json", "-")
        assert r.exit_code == 0, r.stderr
        results.append(json.loads(r.stdout))
    assert results[0]["perplexity"]["compressed"] == pytest.approx(results[1]["perplexity"]["compressed"], rel=1e-4)
    assert results[1]["shared_dims"] == [8]
    r = run_cli("bench", src, tmp_path / "e", "--lengths", "8", "--batch-sizes", "1", "--repeats", "1", "--warmup", "0",
                "--context", "8", "--decode-steps", "2", "--json", "-")
    assert r.exit_code == 0, r.stderr
    record = json.loads(r.stdout)
    assert record["level"] == "model" and record["compressed"] == str(tmp_path / "e")
    assert_clean_failure(run_cli("bench", src, tmp_path / "e", "--level", "module"), 3, "--level model")
    (tmp_path / "e" / "tokenizer.json").write_text("{}", encoding="utf-8")
    assert_clean_failure(run_cli("evaluate", src, tmp_path / "e", "--texts", texts), 3, "export the model again")


def test_calibrated_stock_weighs_layers_by_measured_loss(sources, tmp_path, monkeypatch):
    """With kept windows, the table comes from the layers' spectra weighted by their next-token KL
    per unit of lost energy; the weights are measured on the original model, one layer at a time."""
    from collabcompress.methods import rotary as method

    src = sources["llama"]
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(["the cat sat on the mat and looked at the dog in the garden"] * 6), encoding="utf-8")
    stats = tmp_path / "stats.safetensors"
    r = run_cli("calibrate", src, "--texts", texts, "--out", stats, "--max-length", 32, "--max-tokens", 256,
                "--keep-sequences", 3)
    assert r.exit_code == 0, r.stderr
    seen = []
    real = method.layer_sensitivities

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(method, "layer_sensitivities", spy)
    manifest = compress(src, tmp_path / "c", CompressOptions(rank=8, stock=True, calibration=str(stats)), workers=1)
    assert len(seen) == 1 and len(seen[0]) == 2 and all(w >= 0 for w in seen[0])
    assert sum(manifest["settings"]["frequency_counts"]) == 4
    export(tmp_path / "c", tmp_path / "e")
    with torch.no_grad():
        plain = _plain(tmp_path / "e")(IDS).logits
        ours = hf.from_pretrained(tmp_path / "c").float()(IDS).logits
    assert float((plain - ours).abs().max()) <= 1e-4


# --------------------------------------------------------------------------- tampered outputs (issue 30)

M0 = "model.layers.0.self_attn"


@pytest.fixture(scope="module")
def compressed(sources, tmp_path_factory):
    """The tiny LLaMA at R = r_v = 8 (exportable) and its export, never changed."""
    root = tmp_path_factory.mktemp("export-tamper")
    compress(sources["llama"], root / "c", CompressOptions(rank=8, value_rank=8, force_data_free=True), workers=1)
    export(root / "c", root / "e")
    return root


def _edit_json(name: str, change):
    def edit(d: Path) -> None:
        data = json.loads((d / name).read_text())
        change(data)
        (d / name).write_text(json.dumps(data))
    return edit


def _edit_tensors(change):
    def edit(d: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(d / "model.safetensors"), framework="pt") as f:
            meta = f.metadata()
        tensors = load_file(str(d / "model.safetensors"))
        change(tensors)
        save_file(tensors, str(d / "model.safetensors"), metadata=meta)
    return edit


def _set_freq(value):
    def change(t):
        for i in (0, 1):
            t[f"model.layers.{i}.self_attn.collab_key_freq"] = torch.tensor(value, dtype=torch.int64)
    return change


def _scaled(**factors):
    def change(t):
        for name, factor in factors.items():
            t[f"{M0}.{name}.weight" if name != "collab_mixing" else f"{M0}.{name}"] *= factor
    return change


def _poison(t):
    t["model.embed_tokens.weight"][0, 0] = float("inf")


def _layers(key, value):
    return lambda m: [la.__setitem__(key, value) for la in m["layers"]]


@pytest.mark.parametrize("change, code, words", [
    (_edit_json("collab_manifest.json", _layers("family", "bert")), 3, ["model_type 'llama'", "bert"]),
    (_edit_json("collab_manifest.json", _layers("family", "mistral")), 3, ["model_type 'llama'", "mistral"]),
    (_edit_json("config.json", lambda c: c.update(model_type="qwen3")), 3, ["model_type 'qwen3'", "llama"]),
    (_edit_json("config.json", lambda c: c.update(num_attention_heads=8)), 3, ["config.json", "q_proj"]),
    (_edit_json("config.json", lambda c: c.update(hidden_size=64)), 3, ["config.json"]),
    (_edit_json("config.json", lambda c: c.update(head_dim=16)), 3, ["head_dim 16", "holds 8"]),
    (_edit_json("config.json", lambda c: c.update(num_key_value_heads=1)), 3, ["num_key_value_heads 1", "holds 2"]),
    (_edit_json("config.json", lambda c: c.update(vocab_size=10)), 3, ["config.json", "embed_tokens"]),
    (_edit_json("config.json", lambda c: c.update(tie_word_embeddings=False)), 3, ["config.json", "lm_head"]),
    (_edit_json("config.json", lambda c: c.update(architectures=["BertModel"])), 3, ["architectures", "LlamaForCausalLM"]),
    (_edit_json("config.json", lambda c: c.update(num_hidden_layers="2")), 3, ["config.json", "num_hidden_layers"]),
    (_edit_json("config.json", lambda c: c["rope_parameters"].update(rope_theta="x")), 3, ["rope_theta"]),
    (_edit_json("config.json", lambda c: c["rope_parameters"].update(rope_theta=float("nan"))), 3, ["rope_theta"]),
    (_edit_json("config.json", lambda c: c["rope_parameters"].update(rope_type="made-up")), 4, ["made-up"]),
    (_edit_tensors(lambda t: t.__setitem__(f"{M0}.o_proj.weight", torch.zeros(32, 16))), 3, ["o_proj", "[32, 16]"]),
    (_edit_tensors(lambda t: t.pop(f"{M0}.o_proj.weight")), 3, ["o_proj", "missing"]),
    (_edit_tensors(_set_freq([99] * 4)), 3, ["collab_key_freq", "0..3"]),
    (_edit_tensors(_set_freq([-1, 0, 1, 2])), 3, ["collab_key_freq", "0..3"]),
    (_edit_tensors(_scaled(collab_mixing=1e30, q_proj=1e20)), 3, ["NaN or Inf", "q_proj"]),  # finite, overflows float32
    (_edit_tensors(_scaled(o_proj=1e25, collab_value_up=1e25)), 3, ["NaN or Inf", "o_proj"]),
    (_edit_tensors(_poison), 3, ["NaN or Inf", "embed_tokens"]),  # a copied tensor
], ids=["family-bert", "family-mistral", "model_type", "heads", "hidden_size", "head_dim", "kv-heads", "vocab", "untied", "architectures",
        "layers-string", "rope_theta-string", "rope_theta-nan", "rope-type", "o_proj-shape", "o_proj-missing",
        "freq-past-d/2", "freq-negative", "overflow-q", "overflow-o", "inf-copied"])
def test_a_tampered_output_is_refused_before_anything_is_written(compressed, tmp_path, change, code, words):
    """Outputs edited after compress, hashes re-recorded: exit 3 (4: an unknown rope type) naming
    the file or tensor, never a traceback, an exit 0 with a broken export, or a leftover."""
    import shutil

    from helpers import rerecord_outputs

    src = tmp_path / "c"
    shutil.copytree(compressed / "c", src)
    change(src)
    rerecord_outputs(src)
    before = digest(src)
    assert_clean_failure(run_cli("export", src, "--out", tmp_path / "e"), code, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"] and digest(src) == before


def test_the_score_scale_is_the_family_s_not_the_manifest_s(compressed, tmp_path):
    """The stock queries carry d^-1/2 from the family (as the runtime's), whatever the manifest records."""
    import shutil

    from helpers import rerecord_outputs, stored_tensor

    src = tmp_path / "c"
    shutil.copytree(compressed / "c", src)
    _edit_json("collab_manifest.json", _layers("scale", 1e300))(src)
    rerecord_outputs(src)
    assert run_cli("export", src, "--out", tmp_path / "e").exit_code == 0
    name = f"{M0}.q_proj.weight"
    assert torch.equal(stored_tensor(tmp_path / "e", name), stored_tensor(compressed / "e", name))


def _config_fifo(d: Path) -> None:
    import os

    (d / "config.json").unlink()
    os.mkfifo(d / "config.json")


def _link_out(name: str):
    def link(d: Path) -> None:
        outside = d.parent / f"outside-{name}"
        (d / name).rename(outside)
        (d / name).symlink_to(outside)
    return link


@pytest.mark.parametrize("change, words", [
    (_config_fifo, ["config.json", "not a regular file"]),  # read before: evaluate and bench blocked for ever
    (_link_out("config.json"), ["config.json", "points outside"]),
    (_link_out("export_manifest.json"), ["export manifest", "points outside"]),  # read and trusted before
], ids=["config-fifo", "config-link-out", "manifest-link-out"])
def test_an_export_is_read_through_the_one_reader(compressed, tmp_path, change, words):
    import shutil

    from collabcompress.commands.export import read_export
    from collabcompress.errors import BadInputError

    out = tmp_path / "e"
    shutil.copytree(compressed / "e", out)
    change(out)
    with pytest.raises(BadInputError) as e:
        read_export(out)
    assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("signum, code, line", [(1, 129, "hung up"), (15, 143, "terminated")], ids=["SIGHUP", "SIGTERM"])
def test_a_signal_while_exporting_removes_the_temporary_directory(compressed, tmp_path, signum, code, line):
    import os

    import signal_child
    from helpers import split_stage_lines

    before = digest(compressed / "c")
    marker, stderr = tmp_path / "started", tmp_path / "stderr.txt"
    ws = tmp_path / "ws"
    ws.mkdir()
    proc = signal_child.start(["export", str(compressed / "c"), "--out", str(ws / "e")], marker, "export", stderr)
    assert len(list(ws.glob(".e.tmp-*"))) == 1, "the signal should land while the export is being written"
    os.kill(proc.pid, signum)
    proc.join(60)
    text = stderr.read_text(errors="replace")
    assert proc.exitcode == code, text
    assert split_stage_lines(text)[1] == [line] and "Traceback" not in text, text
    assert not list(ws.iterdir()) and digest(compressed / "c") == before
