"""Where the tests get the real LLaMA tokenizer: ../shared/testdata, else the Hugging Face cache, else one download
of llava-hf's tokenizer.json when online; else they skip, saying how to enable them."""

import huggingface_hub
import pytest

from conftest import ENABLE_REAL_TOKENIZER, LLAVA_HUB_ID, find_llama_tokenizer


@pytest.fixture
def no_shared(tmp_path):
    return tmp_path / "no-shared"


def test_shared_test_data_comes_first(tmp_path, monkeypatch):
    path = tmp_path / "shared" / "testdata" / "llama-tokenizer" / "tokenizer.json"
    path.parent.mkdir(parents=True)
    path.write_text("{}")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: pytest.fail("cache consulted"))
    assert find_llama_tokenizer(tmp_path / "shared")[0] == path


def test_then_the_hub_cache(no_shared, tmp_path, monkeypatch):
    cached = tmp_path / "cache" / "tokenizer.json"
    asked = []
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo, name, **k: asked.append((repo, name)) or str(cached))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("downloaded"))
    assert find_llama_tokenizer(no_shared)[0] == cached
    assert asked == [(LLAVA_HUB_ID, "tokenizer.json")]


def test_then_one_download(no_shared, tmp_path, monkeypatch):
    import conftest
    monkeypatch.setattr(conftest, "hub_reachable", lambda: True)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, name, **k: str(tmp_path / f"{repo.replace('/', '--')}-{name}"))
    path, why = find_llama_tokenizer(no_shared)
    assert path == tmp_path / "llava-hf--llava-1.5-7b-hf-tokenizer.json" and "downloaded" in why


def test_a_failed_download_skips_saying_how_to_enable_it(no_shared, monkeypatch):
    import conftest

    def offline(*a, **k):
        raise ConnectionError("Failed to resolve 'huggingface.co'")
    monkeypatch.setattr(conftest, "hub_reachable", lambda: True)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    path, why = find_llama_tokenizer(no_shared)
    assert path is None and why.startswith(ENABLE_REAL_TOKENIZER) and "ConnectionError" in why
    assert "online" in why and "shared/testdata" in why


def test_offline_it_skips_at_once(no_shared, monkeypatch):
    import time
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")        # nothing listens there
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("tried to download"))
    t0 = time.perf_counter()
    path, why = find_llama_tokenizer(no_shared)
    assert path is None and why.startswith(ENABLE_REAL_TOKENIZER) and time.perf_counter() - t0 < 5
