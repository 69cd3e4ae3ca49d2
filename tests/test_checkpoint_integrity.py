"""Checkpoint integrity as a user hits it through the CLI: every file the reader opens is listed and
verified, symlinks are refused on load and export, export copies exactly the listed files, and an
oversized or hostile config/manifest is refused before anything is allocated (exit 1, one line)."""
from __future__ import annotations

import json
import resource
import shutil
from pathlib import Path

import pytest
from test_cli_e2e import SMALL, invoke, one_line_error

from hawqtool.checkpoint import MANIFEST, WEIGHTS, sha256_file
from hawqtool.errors import UserError
from hawqtool.runtime import load_quantized


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_llama, text_file) -> Path:
    """An RTN checkpoint of the tiny Llama (3 bits everywhere), made once through the CLI."""
    from hawqtool import artifacts
    from hawqtool.allocate.plan import fixed_plan
    from hawqtool.models import load_model, quantizable_layers, weight_matrix

    d = tmp_path_factory.mktemp("integrity")
    model = load_model(str(tiny_llama)).model
    shapes = {n: tuple(weight_matrix(m).shape) for n, m in quantizable_layers(model).items()}
    artifacts.save(fixed_plan(shapes, 3), d / "plan.json")
    invoke("quantize", tiny_llama, "--plan", d / "plan.json", "--calib", text_file, "-o", d / "ck", *SMALL,
           "--method", "rtn", "-q")
    return d / "ck"


@pytest.fixture
def work(ckpt, tmp_path) -> Path:
    """A private copy of the checkpoint to damage."""
    return Path(shutil.copytree(ckpt, tmp_path / "ck"))


def manifest_of(ck: Path) -> dict:
    return json.loads((ck / MANIFEST).read_text())


def write_manifest(ck: Path, mf: dict) -> None:
    (ck / MANIFEST).write_text(json.dumps(mf))


def reseal(ck: Path, *names: str) -> None:
    """Record the current sha256 of `names` in the manifest (a consistent, hostile checkpoint)."""
    mf = manifest_of(ck)
    mf["files"].update({n: sha256_file(ck / n) for n in names})
    write_manifest(ck, mf)


def refused_by_load_and_export(ck: Path, tmp_path: Path, *words: str) -> None:
    """`export` and `eval` both exit 1 with one line naming `words`; nothing is exported."""
    one_line_error(invoke("export", ck, "--format", "gptq", "-o", tmp_path / "ex", ok=False), *words)
    assert not (tmp_path / "ex").exists() and not list(tmp_path.glob("ex.tmp-*"))
    one_line_error(invoke("eval", ck, "--data", "wiki", ok=False), *words)


def flip_last_byte(path: Path) -> None:
    b = bytearray(path.read_bytes())
    b[-1] ^= 0x01
    path.write_bytes(bytes(b))


@pytest.mark.parametrize("entry", [WEIGHTS, "config.json"])
def test_a_manifest_that_does_not_list_the_weights_or_config_is_refused(work, tmp_path, entry):
    mf = manifest_of(work)
    del mf["files"][entry]
    write_manifest(work, mf)
    flip_last_byte(work / entry)  # what an unverified reader would have loaded with exit 0
    refused_by_load_and_export(work, tmp_path, entry, "does not list", "re-create")


def test_a_file_the_manifest_does_not_list_is_refused(work, tmp_path):
    mf = manifest_of(work)
    del mf["files"]["tokenizer.json"]  # the tokenizer loader would open it unverified
    write_manifest(work, mf)
    refused_by_load_and_export(work, tmp_path, "tokenizer.json", "not listed")
    (work / MANIFEST).write_text(json.dumps(manifest_of(work) | {"files": manifest_of(work)["files"] | {
        "tokenizer.json": sha256_file(work / "tokenizer.json")}}))
    (work / "added_tokens.json").write_text("{}")
    refused_by_load_and_export(work, tmp_path, "added_tokens.json", "not listed")


def test_a_corrupt_listed_file_is_refused(work, tmp_path):
    flip_last_byte(work / WEIGHTS)
    refused_by_load_and_export(work, tmp_path, WEIGHTS, "sha256")


def test_a_symlink_with_the_right_bytes_is_still_refused(work, tmp_path):
    outside = tmp_path / "elsewhere.json"
    shutil.move(work / "tokenizer_config.json", outside)
    (work / "tokenizer_config.json").symlink_to(outside)  # same bytes: the sha256 would match
    refused_by_load_and_export(work, tmp_path, "tokenizer_config.json", "symbolic link")


def test_an_unlisted_symlink_to_a_secret_is_never_followed_or_exported(work, tmp_path):
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    (work / "id_rsa").symlink_to(secret)
    mf = manifest_of(work)
    mf["files"]["id_rsa"] = sha256_file(secret)  # even listed with the target's digest
    write_manifest(work, mf)
    refused_by_load_and_export(work, tmp_path, "id_rsa", "symbolic link")
    assert not any(p.read_bytes() == b"PRIVATE KEY" for p in tmp_path.rglob("*") if p.is_file() and p != secret
                   and not p.is_symlink())


def test_a_subfolder_inside_the_checkpoint_is_refused(work, tmp_path):
    (work / "sub").mkdir()
    refused_by_load_and_export(work, tmp_path, "sub", "not a regular file")


def test_export_copies_exactly_the_listed_files(ckpt, tmp_path):
    invoke("export", ckpt, "--format", "gptq", "-o", tmp_path / "ex", "-q")
    listed = set(manifest_of(ckpt)["files"])
    written_by_export = {WEIGHTS, "quantize_config.json", "hawqtool_export.json"}
    assert {p.name for p in (tmp_path / "ex").iterdir()} == listed | written_by_export
    for name in listed - {WEIGHTS, "config.json"}:  # config.json gains its quantization_config
        assert (tmp_path / "ex" / name).read_bytes() == (ckpt / name).read_bytes()
    assert not any(p.is_symlink() for p in (tmp_path / "ex").iterdir())


def test_a_config_asking_for_a_huge_model_is_refused_before_it_is_built(work, tmp_path):
    cfg = json.loads((work / "config.json").read_text())
    cfg.update(vocab_size=10 ** 9, hidden_size=2 ** 16, intermediate_size=2 ** 18)  # ~10^15 floats if built
    (work / "config.json").write_text(json.dumps(cfg))
    reseal(work, "config.json")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(UserError, match="the model expects|is .* but the model"):
        load_quantized(work)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 512 * 1024  # KiB: nothing of that size
    cfg["num_hidden_layers"] = 10 ** 8  # building even an empty skeleton of that would take hours
    (work / "config.json").write_text(json.dumps(cfg))
    reseal(work, "config.json")
    one_line_error(invoke("eval", work, "--data", "wiki", ok=False), "10000000", "layers")


def test_an_oversized_config_file_is_refused_unread(work, tmp_path):
    with open(work / "config.json", "a") as f:
        f.write(" " * (17 << 20))  # valid JSON, 17 MiB of whitespace
    reseal(work, "config.json")
    refused_by_load_and_export(work, tmp_path, "config.json", "bytes")


def test_a_deeply_nested_manifest_is_one_line_not_a_recursion_error(work, tmp_path):
    (work / MANIFEST).write_text("[" * 200_000 + "]" * 200_000)
    refused_by_load_and_export(work, tmp_path, MANIFEST, "nested too deeply")
    (work / MANIFEST).write_text('{"files": ' + "[" * 200_000 + "]" * 200_000 + "}")
    refused_by_load_and_export(work, tmp_path, MANIFEST)


def test_an_oversized_manifest_is_refused_unread(work, tmp_path, monkeypatch):
    import hawqtool.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "MANIFEST_CAP", (work / MANIFEST).stat().st_size - 1)
    refused_by_load_and_export(work, tmp_path, MANIFEST, "bytes")


def test_the_untouched_checkpoint_still_loads_and_exports(ckpt, tmp_path):
    import torch

    model = load_quantized(ckpt)
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()
    invoke("export", ckpt, "--format", "gptq", "-o", tmp_path / "ex", "-q")


def test_run_recomputes_a_damaged_checkpoint_in_its_output_instead_of_skipping_it(tmp_path, tiny_llama, text_file,
                                                                                  caplog):
    out = tmp_path / "out"
    args = ["run", tiny_llama, "--calib", text_file, "--data", text_file, "--avg-bits", 3.0, "-o", out, *SMALL,
            "--sens-samples", 4, "--sens-seqlen", 32, "--max-probes", 4, "--eval-windows", 2, "--eval-seqlen", 64,
            "--json"]
    first = json.loads(invoke(*args).stdout)
    flip_last_byte(out / "mixed" / WEIGHTS)
    again = json.loads(invoke(*args).stdout)
    assert "quantize" in again["stage_seconds"] and "sensitivity" not in again["stage_seconds"]
    assert "sha256 mismatch" in caplog.text and "recomputed" in caplog.text
    assert again["mixed_ppl"] == first["mixed_ppl"]
    load_quantized(out / "mixed")  # intact again
