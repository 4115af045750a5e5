"""Documents and clusters: play splitting, file formats, bad input, clustering invariants
(with the default model's tokenizer and with hypothesis-generated lengths and texts)."""
import json
import re
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spell_core.models.assets import resolve_corpus, resolve_model
from spell_core.data.documents import CorpusError, Document, build_clusters, load_documents, split_play, strip_gutenberg
from spell_core.roles.chat import render_documents


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))


def oracle_tokens(tokenizer, text):
    return len(tokenizer.encode(text, add_special_tokens=False))


def oracle_wrapper(tokenizer):
    """Tokens the prompts put around each document: what stands between two documents' texts
    (10 with the default tokenizer: "\n", "</", "document", ">", "\n", "\n", "<", "document", ">", "\n")."""
    return oracle_tokens(tokenizer, "\n</document>\n\n<document>\n")


def no_space(text):
    return "".join(text.split())


def write(folder, name, content):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


# ------------------------------------------------------------------------ play splitting


@pytest.fixture(scope="module")
def hamlet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hamlet")
    text = (resolve_corpus() / "hamlet.txt").read_text()
    (folder / "hamlet.txt").write_text(text)
    return text, load_documents(folder)


def test_hamlet_is_split_into_its_twenty_scenes(hamlet):
    text, docs = hamlet
    assert len(docs) == 1 + 20  # the front matter, then 5 + 2 + 4 + 7 + 2 scenes
    assert docs[0].text.startswith("HAMLET, PRINCE OF DENMARK") and "PERSONS REPRESENTED" in docs[0].text
    assert [d.id for d in docs] == [f"hamlet/{i:03d}" for i in range(21)]
    assert {d.group for d in docs} == {"hamlet"} and docs[0].source.endswith("hamlet.txt")
    act_openers = [d.text.split("\n")[0] for d in docs if d.text.lower().startswith("act")]
    assert act_openers == ["ACT I.", "Act II.", "ACT III.", "ACT IV.", "ACT V."]
    assert all(d.text.startswith(("ACT", "Act", "Scene")) for d in docs[1:])
    soliloquy = [d for d in docs if "To be, or not to be" in d.text]
    assert len(soliloquy) == 1 and soliloquy[0].text.startswith("ACT III.\n\nScene I. A room in the Castle.")
    assert no_space("".join(d.text for d in docs)) == no_space(text)  # nothing lost or repeated


def test_acts_are_used_when_a_play_has_no_scene_headings():
    play = "THE PLAY\n\nPersons.\n\nACT I.\n\nOne.\n\nACT II.\n\nTwo.\n\nACT III.\nThree."
    assert split_play(play) == ["THE PLAY\n\nPersons.", "ACT I.\n\nOne.", "ACT II.\n\nTwo.", "ACT III.\nThree."]


def test_headings_in_several_styles():
    play = (
        "TITLE\n\nSCENE: Britain; Rome.\n\n"  # the setting line is not a heading
        "ACT FIRST.\n\nSCENE I. A garden.\nA.\n\nSCENE II.\nB, a scene that ends.\n\n"
        "ACT II. SCENE I.\nC.\n\nScene 2.--A street.\nD.\n\n"
        "Actus Tertius. Scoena Prima.\nE.\n\nScena Secunda.\nF."
    )
    assert split_play(play) == [
        "TITLE\n\nSCENE: Britain; Rome.",
        "ACT FIRST.\n\nSCENE I. A garden.\nA.",
        "SCENE II.\nB, a scene that ends.",
        "ACT II. SCENE I.\nC.",
        "Scene 2.--A street.\nD.",
        "Actus Tertius. Scoena Prima.\nE.",
        "Scena Secunda.\nF.",
    ]


def test_an_act_prologue_stays_with_the_acts_first_scene():
    play = "T\n\nACT II.\n\nPROLOGUE.\nChorus speaks.\n\nSCENE I. London.\nA.\n\nSCENE II.\nB."
    assert split_play(play) == ["T", "ACT II.\n\nPROLOGUE.\nChorus speaks.\n\nSCENE I. London.\nA.", "SCENE II.\nB."]


def test_text_without_headings_stays_whole():
    assert split_play("  A poem.\n\nAnother stanza.\n") == ["A poem.\n\nAnother stanza."]
    assert split_play("\n \n") == []


def test_gutenberg_header_and_licence_are_stripped():
    text = (
        "The Project Gutenberg EBook of X\n\nLicence blah\n\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n\nBody line.\n\nMore body.\n\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\n\nMore licence."
    )
    assert strip_gutenberg(text) == "Body line.\n\nMore body."
    old_style = "Small print\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\nBody.\nEnd of Project Gutenberg Etext"
    assert strip_gutenberg(old_style) == "Body."
    assert strip_gutenberg("\nplain text\n") == "plain text"


# ------------------------------------------------------------------------------ formats


def test_folder_of_txt_md_jsonl(tmp_path):
    write(tmp_path, "b_play.txt", "P\n\nACT I.\nx\n\nACT II.\ny")
    write(tmp_path, "a_notes.md", "intro\n\n# One\ntext one\n\n## Two\ntext two")
    write(tmp_path, "sub/c.jsonl", '{"id": "q1", "text": "alpha", "cluster": "k"}\n\n{"id": 7, "text": "beta"}\n')
    write(tmp_path, ".hidden.txt", "ignored")
    write(tmp_path, ".git/config.txt", "ignored")
    write(tmp_path, "image.png", b"\x89PNG")
    docs = load_documents(tmp_path)
    assert [(d.id, d.group, d.text) for d in docs] == [
        ("a_notes/000", "a_notes", "intro"),
        ("a_notes/001", "a_notes", "# One\ntext one"),
        ("a_notes/002", "a_notes", "## Two\ntext two"),
        ("b_play/000", "b_play", "P"),
        ("b_play/001", "b_play", "ACT I.\nx"),
        ("b_play/002", "b_play", "ACT II.\ny"),
        ("q1", "k", "alpha"),
        ("7", "sub/c", "beta"),
    ]
    assert docs[-1].source == f"{tmp_path / 'sub' / 'c.jsonl'}:3" and docs[0].n_tokens is None


def test_utf8_bom_and_windows_newlines(tmp_path):
    write(tmp_path, "w.txt", "\ufeffFirst line\r\nSecond line\r\n".encode("utf-8"))
    assert load_documents(tmp_path)[0].text == "First line\nSecond line"


# ---------------------------------------------------------------------------- bad input


def test_missing_folder(tmp_path):
    with pytest.raises(CorpusError, match="corpus folder .*nope does not exist"):
        load_documents(tmp_path / "nope")


def test_file_instead_of_folder(tmp_path):
    with pytest.raises(CorpusError, match="is not a folder"):
        load_documents(write(tmp_path, "a.txt", "x"))


def test_empty_folder(tmp_path):
    with pytest.raises(CorpusError, match=r"corpus folder .* is empty; put .txt / .md / .jsonl files in it"):
        load_documents(tmp_path)


def test_no_supported_files(tmp_path):
    write(tmp_path, "book.pdf", b"%PDF")
    with pytest.raises(CorpusError, match=r"has no .txt / .md / .jsonl files \(found 1 other file\(s\): book.pdf\)"):
        load_documents(tmp_path)


def test_only_empty_files(tmp_path):
    write(tmp_path, "a.txt", "\n  \n")
    with pytest.raises(CorpusError, match="every .txt / .md / .jsonl file is empty"):
        load_documents(tmp_path)


def test_undecodable_bytes_name_the_file_and_offset(tmp_path):
    write(tmp_path, "ok.txt", "fine")
    path = write(tmp_path, "latin.txt", "caf".encode() + b"\xe9 au lait")
    with pytest.raises(CorpusError, match=rf"{path}: byte offset 3 \(0xe9\) is not valid UTF-8; convert the file to UTF-8"):
        load_documents(tmp_path)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"id": "a", "text": "x"', r"c.jsonl:2: not valid JSON"),
        ('["a", "x"]', r"c.jsonl:2: expected a JSON object with 'id' and 'text', got list"),
        ('{"id": "a"}', r"c.jsonl:2: missing field 'text'"),
        ('{"text": "x"}', r"c.jsonl:2: missing field 'id'"),
        ('{"id": null, "text": "x"}', r"c.jsonl:2: 'id' must be a non-empty string or an integer"),
        ('{"id": "a", "text": "  "}', r"c.jsonl:2: 'text' must be a non-empty string"),
        ('{"id": "a", "text": "x", "cluster": [1]}', r"c.jsonl:2: 'cluster' must be a string or an integer"),
    ],
)
def test_malformed_jsonl_line(tmp_path, line, message):
    write(tmp_path, "c.jsonl", '{"id": "first", "text": "ok"}\n' + line + "\n")
    with pytest.raises(CorpusError, match=message):
        load_documents(tmp_path)


def test_duplicate_ids(tmp_path):
    write(tmp_path, "c.jsonl", json.dumps({"id": "a", "text": "x"}) + "\n" + json.dumps({"id": "a", "text": "y"}))
    with pytest.raises(CorpusError, match=r"document id 'a' appears twice: .*c.jsonl:1 and .*c.jsonl:2"):
        load_documents(tmp_path)


@pytest.mark.parametrize("budget", [0, -1, 2.5, True])
def test_bad_budget(budget, tokenizer):
    with pytest.raises(ValueError, match="budget_tokens must be a positive integer"):
        build_clusters([Document("a", "x", "s")], tokenizer, budget)


def test_no_documents(tokenizer):
    with pytest.raises(CorpusError, match="no documents to cluster"):
        build_clusters([], tokenizer, 100)


# ------------------------------------------------------------------ clustering invariants


def check_clusters(documents, clusters, budget, tokenizer):
    """Invariants, checked against the tokenizer called directly (not through the code under test)."""
    originals = {d.id: d for d in documents}
    pieces = [doc for cluster in clusters for doc in cluster.documents]
    # every document in exactly one cluster (split ones as consecutive pieces that rebuild it)
    rebuilt = {}
    for doc in pieces:
        base = doc.id if doc.id in originals else doc.id.rsplit("#", 1)[0]
        rebuilt[base] = rebuilt.get(base, "") + doc.text
    assert list(rebuilt) == [d.id for d in documents]  # every one, once, in the original order
    assert all(rebuilt[i] == d.text for i, d in originals.items())
    assert len({d.id for d in pieces}) == len(pieces)
    wrapper = oracle_wrapper(tokenizer)
    for cluster in clusters:
        counts = [oracle_tokens(tokenizer, d.text) for d in cluster.documents]
        assert [d.n_tokens for d in cluster.documents] == counts
        assert cluster.n_tokens == sum(counts) + wrapper * len(counts) <= budget
        # the documents as the prompts show them fit the budget
        assert oracle_tokens(tokenizer, render_documents(cluster.documents)) <= cluster.n_tokens
        assert len({d.group for d in cluster.documents}) == 1
    assert len({c.id for c in clusters}) == len(clusters)


def fewest_parts(lengths, budget):
    parts, total = 1, 0
    for n in lengths:
        if total + n > budget:
            parts, total = parts + 1, 0
        total += n
    return parts


def test_clusters_of_real_plays(tmp_path, tokenizer):
    corpus = resolve_corpus()
    for work in ("macbeth", "phoenix_and_the_turtle", "sonnets"):
        write(tmp_path, f"{work}.txt", (corpus / f"{work}.txt").read_text())
    documents = load_documents(tmp_path)
    budget = 6000  # some Macbeth scenes and the sonnets are longer: they get split
    clusters = build_clusters(documents, tokenizer, budget)
    check_clusters(documents, clusters, budget, tokenizer)
    assert any("#" in d.id for c in clusters for d in c.documents)
    assert [c.id.split("#")[0] for c in clusters] == sorted(c.id.split("#")[0] for c in clusters)
    for group in ("macbeth", "sonnets"):
        lengths = [d.n_tokens + oracle_wrapper(tokenizer) for c in clusters if c.documents[0].group == group
                   for d in c.documents]
        assert sum(c.documents[0].group == group for c in clusters) == fewest_parts(lengths, budget)
    sonnet_pieces = [d for c in clusters for d in c.documents if d.group == "sonnets"]
    assert all(re.search(r"\n[ \t]*\n$", d.text) for d in sonnet_pieces[:-1])  # cut at blank lines


def test_jsonl_clusters_follow_the_cluster_field(tmp_path, tokenizer):
    lines = [{"id": f"d{i}", "text": f"Document number {i}. " * 20, "cluster": "ab"[i % 2]} for i in range(6)]
    write(tmp_path, "docs.jsonl", "\n".join(json.dumps(line) for line in lines))
    clusters = build_clusters(load_documents(tmp_path), tokenizer, 10_000)
    assert [[d.id for d in c.documents] for c in clusters] == [["d0", "d2", "d4"], ["d1", "d3", "d5"]]


def test_a_document_without_any_separator_is_cut_inside(tokenizer):
    doc = Document("blob", "x" * 4000, "s", group="g")
    clusters = build_clusters([doc], tokenizer, 100)
    check_clusters([doc], clusters, 100, tokenizer)
    assert len(clusters) > 1


class NoTokenizer:
    def __call__(self, *args, **kwargs):
        raise AssertionError("token counts were given: the tokenizer must not be called")


@settings(max_examples=200, deadline=None)
@given(
    docs=st.lists(st.tuples(st.sampled_from("abc"), st.integers(1, 50)), min_size=1, max_size=12),
    budget=st.integers(53, 123),
)
def test_partition_is_fewest_and_most_balanced(docs, budget):
    documents = [Document(f"d{i}", "text", "s", n_tokens=n, group=g) for i, (g, n) in enumerate(docs)]
    clusters = build_clusters(documents, NoTokenizer(), budget, wrapper_tokens=3)
    groups = list(dict.fromkeys(g for g, _ in docs))
    by_group = {g: [d for d in documents if d.group == g] for g in groups}
    assert [d.id for c in clusters for d in c.documents] == [d.id for g in groups for d in by_group[g]]
    for g in groups:
        mine = [c for c in clusters if c.documents[0].group == g]
        lengths = [d.n_tokens + 3 for d in by_group[g]]
        best = best_partition(lengths, budget)  # (fewest clusters, smallest largest cluster)
        assert (len(mine), max(c.n_tokens for c in mine)) == best
        assert all(c.n_tokens == sum(d.n_tokens + 3 for d in c.documents) <= budget for c in mine)


def best_partition(lengths, budget):
    """Brute force over every way to cut the sequence into consecutive parts."""
    n, best = len(lengths), None
    for mask in range(1 << (n - 1)):
        sums, total = [], lengths[0]
        for i in range(1, n):
            if mask >> (i - 1) & 1:
                sums.append(total)
                total = 0
            total += lengths[i]
        sums.append(total)
        if max(sums) <= budget:
            key = (len(sums), max(sums))
            best = key if best is None or key < best else best
    return best


words = st.sampled_from(["the", "King", "Hamlet,", "to", "be", "or", "not", "O!", "—", "well-a-day", "x" * 30])
separators = st.sampled_from([" ", " ", " ", "\n", "\n\n", "\n \n\n"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    texts=st.lists(st.lists(st.tuples(words, separators), min_size=1, max_size=60), min_size=1, max_size=4),
    budget=st.integers(18, 70),  # 8 to 60 tokens of text once the 10 of each document's tags are counted
)
def test_real_tokenizer_invariants(texts, budget, tokenizer):
    documents = [
        Document(f"w/{i}", "".join(w + s for w, s in pairs).strip() or "x", "s", group="w" if i % 3 else "v")
        for i, pairs in enumerate(texts)
    ]
    order = sorted(documents, key=lambda d: d.group != documents[0].group)  # groups by first appearance
    clusters = build_clusters(documents, tokenizer, budget)
    check_clusters(order, clusters, budget, tokenizer)


class _WordTokenizer:  # one token per whitespace-separated word: cluster sizes worked by hand
    def __call__(self, texts, **kwargs):
        return {"input_ids": [t.split() for t in texts]}


def test_clusters_count_the_tags_around_each_document():
    # "<document>\nthe red fox\n</document>" is 5 words: each 3-word document takes 5 of the
    # budget of 10, so 2 per cluster (counting the text alone, 3 would fit: 9 words of text
    # rendered as 15 words of prompt)
    documents = [Document(f"d{i}", "the red fox", "s", group="g") for i in range(5)]
    clusters = build_clusters(documents, _WordTokenizer(), 10)
    assert [[d.id for d in c.documents] for c in clusters] == [["d0", "d1"], ["d2", "d3"], ["d4"]]
    assert [c.n_tokens for c in clusters] == [10, 10, 5]
    assert all(len(render_documents(c.documents).split()) <= 10 for c in clusters)
    # a document of 9 words leaves room for 8 per piece once its 2 tags are counted
    long = Document("long", "one two three four five six seven eight nine", "s", group="g")
    assert [d.text for c in build_clusters([long], _WordTokenizer(), 10) for d in c.documents] == \
        ["one two three four five six seven eight ", "nine"]
    with pytest.raises(ValueError, match="cannot hold any document: the prompt puts 2 tokens of tags"):
        build_clusters(documents, _WordTokenizer(), 2)


def test_many_small_documents_fit_the_context_with_their_tags(tokenizer):
    documents = [Document(f"n{i}", f"Note {i}: the lantern hangs by door {i}.", "s", group="notes")
                 for i in range(400)]
    budget = 2000
    clusters = build_clusters(documents, tokenizer, budget)
    text_only = sum(oracle_tokens(tokenizer, d.text) for d in documents)
    assert len(clusters) > text_only / budget + 1  # the tags (10 tokens a document) take room
    for cluster in clusters:
        assert oracle_tokens(tokenizer, render_documents(cluster.documents)) <= budget
