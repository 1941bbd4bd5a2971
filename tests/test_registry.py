"""The family registry: adding a family is one definition in one module.

A family unknown to the package ("blocks": BERT attention under other module names,
``encoder.blocks.{i}.attn.self.{query,key}``, config model_type ``blocks-bert``) is defined
here, in this file only, and registered for the test. Its tiny checkpoint is then analysed,
compressed and verified through the CLI, and loaded: "load" means
``collabcompress.hf.from_pretrained`` building the test's own transformers model class
(a ``PreTrainedModel`` whose blocks hold transformers' ``BertAttention`` under the new
names) with collaborative attention, which must reproduce the original model at R = H*d.
No other module of the package is touched. A second test reads the package's source and
finds no table keyed by family names outside the registry module.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from transformers.models.bert.modeling_bert import BertAttention  # noqa: E402

from collabcompress.files.families import FAMILIES, Family, register  # noqa: E402
from collabcompress.hf import from_pretrained  # noqa: E402
from collabcompress.runtime.adapters import collaborative_modules  # noqa: E402

HEADS, D, LAYERS = 4, 32, 2

# The one definition of the new family.
BLOCKS = Family(
    "blocks", "test-only BERT with renamed modules", r"encoder\.blocks\.\d+\.attn\.self", "query", "key",
    "encoder.blocks.{i}.attn.self.{query,key}",
    value="{m}.value.weight", output="{parent}.output.dense.weight",
    feeding_norms=("{p}encoder.blocks.{prev}.attn.output.LayerNorm",),
    hf_classes=("BertSelfAttention",), hf_adapter="_BertSelf")


class BlocksConfig(transformers.BertConfig):
    model_type = "blocks-bert"


class _Block(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.attn = BertAttention(config, layer_idx=layer_idx)

    def forward(self, hidden_states):
        return self.attn(hidden_states)[0]


class BlocksModel(transformers.PreTrainedModel):
    """Embeddings and attention blocks named ``encoder.blocks.{i}.attn``: a naming no built-in family has."""

    config_class = BlocksConfig
    base_model_prefix = "blocks"

    def __init__(self, config):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.encoder = nn.Module()
        self.encoder.blocks = nn.ModuleList(_Block(config, i) for i in range(config.num_hidden_layers))
        self.post_init()

    def forward(self, input_ids):
        hidden = self.embeddings(input_ids)  # (B, N, D)
        for block in self.encoder.blocks:
            hidden = block(hidden)
        return hidden


transformers.AutoConfig.register(BlocksConfig.model_type, BlocksConfig, exist_ok=True)


@pytest.fixture
def blocks(tmp_path) -> Path:
    """The family registered for one test, and its tiny checkpoint (sharpened scores)."""
    torch.manual_seed(0)
    config = BlocksConfig(vocab_size=100, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                          intermediate_size=64, max_position_embeddings=64)
    model = BlocksModel(config).eval()
    with torch.no_grad():
        for block in model.encoder.blocks:
            block.attn.self.query.weight.mul_(6.0)  # random weights attend almost uniformly otherwise
    transformers.utils.logging.disable_progress_bar()
    try:
        model.save_pretrained(str(tmp_path / "source"))
    finally:
        transformers.utils.logging.enable_progress_bar()
    register(BLOCKS)
    yield tmp_path / "source"
    FAMILIES.remove(BLOCKS)


def test_a_family_defined_in_one_place_analyzes_compresses_and_loads(blocks, tmp_path, cli):
    modules = [f"encoder.blocks.{i}.attn.self" for i in range(LAYERS)]
    result = cli("analyze", blocks, "--json", "-")
    assert result.exit_code == 0, result.stderr
    analysis = json.loads(result.stdout)
    assert analysis["architecture"] == "blocks"
    assert [(la["module"], la["heads"], la["head_dim"], la["d_model"]) for la in analysis["layers"]] == \
        [(m, HEADS, D // HEADS, D) for m in modules]

    out = tmp_path / "full"
    result = cli("compress", blocks, "--out", out, "--rank", str(D), "--json", "-")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((out / "collab_manifest.json").read_text())
    assert manifest["source"]["architecture"] == "blocks"
    assert [la["module"] for la in manifest["layers"]] == modules
    assert manifest["layers"][0]["removed"] == [f"{modules[0]}.{n}" for n in
                                                ("query.weight", "query.bias", "key.weight", "key.bias")]

    result = cli("verify", out, "--json", "-")
    assert result.exit_code == 0, result.stderr
    probes = [la["probe"] for la in json.loads(result.stdout)["layers"]]
    assert probes[1] == "through encoder.blocks.0.attn.output.LayerNorm"  # the family's feeding norm

    model = from_pretrained(out, model_class=BlocksModel)
    assert sorted(collaborative_modules(model)) == modules
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = BlocksModel.from_pretrained(str(blocks)).eval()(ids)
        torch.testing.assert_close(model(ids), expected, rtol=0, atol=1e-4)


def test_unregistered_the_family_is_unknown(tmp_path, cli):
    assert all(f.name != "blocks" for f in FAMILIES)
    result = cli("analyze", tmp_path, "--arch", "blocks")
    assert result.exit_code == 3


def _family_keyed_literals(source: str, where: str, names: set[str]) -> list[str]:
    """Dict keys, members of tuple/list/set literals and comparands that are family names."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Dict):
            items = node.keys
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            items = node.elts
        elif isinstance(node, ast.Compare):  # x == "albert", x in ("t5", "bart")
            items = [node.left, *node.comparators]
        else:
            continue
        hits = [i.value for i in items if isinstance(i, ast.Constant) and i.value in names]
        if hits:
            found.append(f"{where}:{node.lineno}: {', '.join(hits)}")
    return found


def test_no_table_keyed_by_family_names_outside_the_registry():
    import collabcompress

    package = Path(collabcompress.__file__).parent
    names = {f.name for f in FAMILIES}
    assert {"bert", "gpt2", "t5", "bart"} <= names
    found = [hit for path in sorted(package.glob("*.py")) if path.name != "families.py"
             for hit in _family_keyed_literals(path.read_text(encoding="utf-8"), path.name, names)]
    assert found == []
    # the check finds the kinds of table the registry replaced
    for old in ('_FEEDING_NORMS = {"bert": ["{p}embeddings.LayerNorm"]}',
                'TEXT_FAMILIES = ("bert", "mpnet")',
                'cross = spec.family in ("t5", "bart")',
                'shared = family == "albert"'):
        assert _family_keyed_literals(old, "old", names), old
