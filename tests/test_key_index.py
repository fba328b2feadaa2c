"""io/key_index.KeyIndex: the row of each key or -1, as a dict would say, whatever the hashes
do (collisions forced by keeping 1 to 3 bits of each hash), for keys of every length."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from speaker_sim_cli.io.key_index import KeyIndex


def random_keys(rng: np.random.Generator, n: int) -> list[str]:
    """Distinct keys of 0-40 characters, ASCII and not, many sharing long prefixes."""
    alphabet = [*"abcxyz019/._-", "ü", "ß", "语", "\x00", " "]
    out: dict[str, None] = {}
    while len(out) < n:
        k = "".join(rng.choice(alphabet, size=int(rng.integers(0, 41))))
        if rng.random() < 0.3:
            k = "id10270/5r0dWxy17C8/" + k  # same first words, differ late
        out[k] = None
    return list(out)


def expected(table: list[str], queries: list[str]) -> list[int]:
    where = {k: i for i, k in enumerate(table)}
    return [where.get(q, -1) for q in queries]


@pytest.mark.parametrize("words", [0, 8])  # table keys checked in their bytes / word columns
@pytest.mark.parametrize("bits", [1, 3, 64])
def test_rows_are_a_dicts_answers_even_when_every_hash_collides(bits, words, monkeypatch):
    from speaker_sim_cli.io import key_index

    monkeypatch.setattr(key_index, "WORDS", words)
    rng = np.random.default_rng(bits)
    table = random_keys(rng, 3000 if bits == 64 else 300)  # few bits: chains as long as that
    absent = [k + "!" for k in table[:100]] + [k[:-1] for k in table[:100] if k] + ["", "a"]
    queries = [table[i] for i in rng.integers(0, len(table), 2000)] + absent
    queries = [queries[i] for i in rng.permutation(len(queries))]
    ix = KeyIndex(pa.array(table), hash_bits=bits)
    assert len(ix) == len(table)
    assert ix.rows(pa.array(queries)).tolist() == expected(table, queries)


def test_keys_that_differ_only_in_their_last_byte_or_their_length():
    table = ["r000000001", "r000000002", "r00000000", "r0000000010", "r000000001\x00", ""]
    ix = KeyIndex(pa.array(table), hash_bits=2)
    queries = [*table, "r000000003", "r00000001", "\x00", "r000000001 "]
    assert ix.rows(pa.array(queries)).tolist() == expected(table, queries)


def test_sliced_chunked_and_large_string_columns():
    rng = np.random.default_rng(0)
    table = random_keys(rng, 500)
    ix = KeyIndex(pa.chunked_array([pa.array(table[:200]), pa.array(table[200:])]))
    q = [table[i] for i in rng.integers(0, 500, 800)] + ["nope"]
    col = pa.array(["pad"] * 7 + q + ["pad"] * 3).slice(7, len(q))  # an offset into its buffers
    assert ix.rows(col).tolist() == expected(table, q)
    chunked = pa.chunked_array([pa.array(q[:100]), pa.array(q[100:])])
    assert ix.rows(chunked).tolist() == expected(table, q)
    assert ix.rows(pa.array(q, pa.large_string())).tolist() == expected(table, q)
    assert ix.rows(pa.array([], pa.string())).tolist() == []
    assert ix.rows(pa.chunked_array([], pa.string())).tolist() == []


def test_an_empty_table_finds_nothing_and_a_key_twice_is_refused():
    assert KeyIndex(pa.array([], pa.string())).rows(pa.array(["a", ""])).tolist() == [-1, -1]
    with pytest.raises(ValueError, match="'b' appears twice"):
        KeyIndex(pa.array(["a", "b", "c", "b"]))
    with pytest.raises(ValueError, match="null"):
        KeyIndex(pa.array(["a", None]))
