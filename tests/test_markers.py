"""Every test that uses the real data carries the ``real`` marker, so ``-m "not real"`` never
needs the data cache."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REAL_FIXTURES

CONFTEST = Path(__file__).with_name("conftest.py")


def _is_fixture(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return isinstance(target, ast.Attribute) and target.attr == "fixture"


def test_the_real_fixtures_are_exactly_those_that_read_the_data_cache():
    readers = set()
    for node in ast.walk(ast.parse(CONFTEST.read_text(encoding="utf-8"))):
        if isinstance(node, ast.FunctionDef) and any(_is_fixture(d) for d in node.decorator_list):
            calls = {c.func.id for c in ast.walk(node) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
            if "_cached" in calls:
                readers.add(node.name)
    assert readers == REAL_FIXTURES


def test_every_collected_test_using_real_data_is_marked_real(request):
    items = request.session.items
    unmarked = [item.nodeid for item in items
                if REAL_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("real") is None]
    assert unmarked == []


@pytest.mark.real
def test_a_test_marked_real_may_read_the_cache_others_see_an_empty_one():
    from collabcompress.files.texts import cache_dir

    assert "empty-data-cache" not in str(cache_dir())


def test_tests_not_marked_real_see_an_empty_data_cache():
    from collabcompress.files.texts import cache_dir, lee_corpus

    assert cache_dir().name == "empty-data-cache" and lee_corpus() is None
