"""Files of checkpoint and run directories are untrusted input: no pickle is ever executed (a sharded
checkpoint's dcp/.metadata included), file names read from files stay inside their directory, and a
malformed file gives one `dsv3 VERB: error: <file>: <problem>` line on stderr, exit status 2, no
traceback (DSV3_TRACEBACK=1 shows it). CPU, tiny fp32 models, in-process through `dsv3.cli.main`.

Run: python -m pytest tests/test_untrusted_files.py -q
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import get_state_dict

from dsv3.checkpoints import rundir
from dsv3.checkpoints.dcp import DCP_DIR, RNG_DIR, is_dcp_checkpoint, load_dcp, load_dcp_local, load_full_model, to_hf
from dsv3.checkpoints.files import CheckpointError
from dsv3.checkpoints.hf import load_pretrained, quantize_checkpoint, save_pretrained
from dsv3.tokenizer import DSTokenizer
from conftest import make_model, tiny_cfg
from conftest import run_cli

VOCAB = 320  # room for a trained byte-level BPE (256 bytes + 18 specials + a few merges)


def assert_one_line_error(rc, err, *needles):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for n in needles:
        assert str(n) in lines[0], (n, err)


class _Trap:
    """Unpickling it runs `fn(*args)`: here, something that creates a marker file."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _traps(marker):
    return [_Trap(open, (str(marker), "w")), _Trap(os.system, (f"touch {marker}",))]


@pytest.fixture(scope="module")
def tok():
    texts = [f"def f{i}(x):\n    return x + {i}\n" for i in range(60)]
    return DSTokenizer.train(texts, 300)


@pytest.fixture(scope="module")
def model():
    return make_model(tiny_cfg(vocab_size=VOCAB))


@pytest.fixture
def hf_dir(tmp_path, model, tok):
    """A complete Hugging Face-format checkpoint (config.json, model.safetensors, tokenizer)."""
    d = tmp_path / "ckpt"
    save_pretrained(model, d, mtp_copies=False)
    tok.save(d)
    return d


def _write_dcp(path, model, opt=None):
    """What save_dcp writes for one rank: trainer_state.json, dcp/ (model + AdamW state), rng/."""
    if opt is None:
        opt = torch.optim.AdamW(model.parameters())
    msd, osd = get_state_dict(model, opt)
    os.makedirs(path / RNG_DIR)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": msd, "optim": osd["state"]}, checkpoint_id=str(path / DCP_DIR), no_dist=True)
    rt, rmeta = rundir.rng_state()
    save_file(rt, path / RNG_DIR / "rank_00000.safetensors", metadata={"meta": json.dumps(rmeta)})
    (path / "trainer_state.json").write_text(json.dumps(
        {"format": "dcp", "step": 1, "model_config": model.config.to_dict(), "layout": {"world_size": 1}}))


@pytest.fixture
def dcp_dir(tmp_path, model, tok):
    d = tmp_path / "step_00000001"
    _write_dcp(d, model)
    tok.save(d)
    return d


def _metadata(d):
    from dsv3.checkpoints.safe_dcp import read_metadata

    return read_metadata(str(d / DCP_DIR / ".metadata"), str(d / DCP_DIR))


# --------------------------------------------------------------------------------------------------
# 1. sharded (DCP) checkpoints: no pickle executed

def test_genuine_dcp_checkpoint_loads(tmp_path):
    """The safe reader reads what DCP writes: model and optimizer round-trip exactly."""
    model = make_model(tiny_cfg(vocab_size=VOCAB))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = model(torch.arange(8).view(1, 8))
    (out.logits.sum() + sum(m.sum() for m in out.mtp_logits)).backward()  # every parameter gets AdamW state
    opt.step()
    opt.zero_grad()
    d = tmp_path / "ck"
    _write_dcp(d, model, opt)
    assert is_dcp_checkpoint(str(d))
    full = load_full_model(str(d))
    for (n, a), b in zip(model.state_dict().items(), full.state_dict().values()):
        assert torch.equal(a, b), n
    other = make_model(tiny_cfg(vocab_size=VOCAB), seed=5)
    opt2 = torch.optim.AdamW(other.parameters(), lr=1e-2)
    state = load_dcp_local(str(d), other, opt2)
    assert state["step"] == 1
    for (n, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), n
    moments = [opt2.state[p]["exp_avg"] for p in other.parameters()]
    assert all(torch.equal(m, opt.state[p]["exp_avg"]) for m, p in zip(moments, model.parameters()))


@pytest.mark.parametrize("kind", ["open", "os.system", "nested"])
def test_crafted_dcp_metadata_is_refused_unexecuted(dcp_dir, tmp_path, model, kind):
    marker = tmp_path / "PWNED"
    trap = _traps(marker)[kind == "os.system"]
    if kind == "nested":  # a genuine Metadata with one storage record replaced by the trap
        md = _metadata(dcp_dir)
        md.storage_data[next(iter(md.storage_data))] = trap
        trap = md
    with open(dcp_dir / DCP_DIR / ".metadata", "wb") as f:
        pickle.dump(trap, f)
    opt = torch.optim.AdamW(model.parameters())
    loaders = {
        "load_full_model": lambda: load_full_model(str(dcp_dir)),
        "load_dcp_local": lambda: load_dcp_local(str(dcp_dir), model, opt),
        # the torchrun path refuses before any collective (so no process group is needed here)
        "load_dcp": lambda: load_dcp(str(dcp_dir), model, opt, type("PS", (), {"pcfg": type("P", (), {"ep": 1})})()),
        "to_hf": lambda: to_hf(str(dcp_dir), str(tmp_path / "out")),
    }
    for name, load in loaders.items():
        with pytest.raises(CheckpointError, match=r"\.metadata: refused") as ei:
            load()
        assert "\n" not in str(ei.value), name
        assert not marker.exists(), name
    rc, _, err = run_cli(["convert", dcp_dir, tmp_path / "out"])
    assert_one_line_error(rc, err, ".metadata", "refused")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_metadata_unpickler_admits_only_constants_and_dcp_classes():
    from dsv3.checkpoints.safe_dcp import _layout, _MetadataUnpickler

    u = _MetadataUnpickler(io.BytesIO(b""))
    assert u.find_class("torch", "bfloat16") is torch.bfloat16 and u.find_class("torch", "Size") is torch.Size
    assert u.find_class("torch.serialization", "_get_layout")("torch.strided") is torch.strided
    for module, name in [("torch", "load"), ("torch", "save"), ("builtins", "eval"), ("os", "system"),
                         ("torch.distributed.checkpoint.metadata", "os"), ("torch.serialization", "load")]:
        with pytest.raises(pickle.UnpicklingError, match="not part of DCP metadata"):
            u.find_class(module, name)
    with pytest.raises(pickle.UnpicklingError, match="unknown layout"):
        _layout("torch.load")


def test_dcp_pickled_bytes_entry_is_refused_unexecuted(dcp_dir, tmp_path):
    """A metadata entry declared as bytes makes DCP torch.load(weights_only=False) the payload: refused."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    marker = tmp_path / "PWNED"
    payload = pickle.dumps(_traps(marker)[0])
    (dcp_dir / DCP_DIR / "evil.distcp").write_bytes(payload)
    md = _metadata(dcp_dir)
    fqn = "model.norm.weight"
    md.state_dict_metadata[fqn] = BytesStorageMetadata()
    md.storage_data[MetadataIndex(fqn)] = _StorageInfo("evil.distcp", 0, len(payload))
    with open(dcp_dir / DCP_DIR / ".metadata", "wb") as f:
        pickle.dump(md, f)
    with pytest.raises(CheckpointError, match="model.norm.weight.*pickled bytes"):
        load_full_model(str(dcp_dir))
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../outside.distcp", "/abs/file.distcp", "link.distcp"])
def test_dcp_data_file_outside_directory_is_refused(dcp_dir, tmp_path, name):
    md = _metadata(dcp_dir)
    first = next(iter(md.storage_data))
    info = md.storage_data[first]
    shutil.copy(dcp_dir / DCP_DIR / info.relative_path, tmp_path / "outside.distcp")
    if name == "link.distcp":
        os.symlink(tmp_path / "outside.distcp", dcp_dir / DCP_DIR / name)
    info.relative_path = name
    with open(dcp_dir / DCP_DIR / ".metadata", "wb") as f:
        pickle.dump(md, f)
    with pytest.raises(CheckpointError, match=f"{name}.*outside"):
        load_full_model(str(dcp_dir))


def test_corrupt_dcp_metadata(dcp_dir, tmp_path):
    p = dcp_dir / DCP_DIR / ".metadata"
    p.write_bytes(p.read_bytes()[:200])
    rc, _, err = run_cli(["convert", dcp_dir, tmp_path / "out"])
    assert_one_line_error(rc, err, ".metadata", "corrupt")


@pytest.mark.parametrize("content, needle", [("{oops", "not valid JSON"), ("[1, 2]", "expected a JSON object"),
                                             ('{"format": "dcp", "layout": {"world_size": 1}}', "model_config")])
def test_malformed_trainer_state(dcp_dir, tmp_path, content, needle):
    (dcp_dir / "trainer_state.json").write_text(content)
    rc, _, err = run_cli(["convert", dcp_dir, tmp_path / "out"])
    assert_one_line_error(rc, err, "trainer_state.json", needle)


def test_missing_dcp_rng_file(dcp_dir, model):
    os.remove(dcp_dir / RNG_DIR / "rank_00000.safetensors")
    with pytest.raises(CheckpointError, match=r"rank_00000\.safetensors: file not found"):
        load_dcp_local(str(dcp_dir), model, torch.optim.AdamW(model.parameters()))


# --------------------------------------------------------------------------------------------------
# 2. model.safetensors.index.json names only files inside the directory

def _shard(hf_dir, tmp_path, model):
    """Re-save hf_dir sharded; return (index dict, one shard name)."""
    for f in ("model.safetensors", "config.json"):
        os.remove(hf_dir / f)
    save_pretrained(model, hf_dir, max_shard_bytes=60_000, mtp_copies=False)
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    return index, sorted(set(index["weight_map"].values()))[0]


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_index_entry_outside_directory_is_refused(hf_dir, tmp_path, model, how):
    index, shard = _shard(hf_dir, tmp_path, model)
    outside = tmp_path / "elsewhere" / shard
    outside.parent.mkdir()
    shutil.move(hf_dir / shard, outside)
    entry = {"dotdot": f"../elsewhere/{shard}", "absolute": str(outside), "symlink": shard}[how]
    if how == "symlink":
        os.symlink(outside, hf_dir / shard)
    index["weight_map"] = {k: (entry if v == shard else v) for k, v in index["weight_map"].items()}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the checkpoint directory") as ei:
        load_pretrained(hf_dir)
    assert entry in str(ei.value) and "model.safetensors.index.json" in str(ei.value)
    rc, _, err = run_cli(["generate", hf_dir, "--prompt", "x", "--max-new-tokens", 1])
    assert_one_line_error(rc, err, "model.safetensors.index.json", entry)


def test_hugging_face_cache_snapshot_links_load(tmp_path, model):
    """snapshots/<rev>/* -> ../../blobs/<hash>: the hub cache layout is not an escape."""
    repo = tmp_path / "models--org--tiny"
    src = tmp_path / "src"
    save_pretrained(model, src, mtp_copies=False)
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(os.listdir(src))):
        shutil.move(src / f, repo / "blobs" / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snap / f)
    loaded = load_pretrained(snap)
    assert torch.equal(loaded.state_dict()["embed_tokens.weight"], model.state_dict()["embed_tokens.weight"])


def test_save_never_deletes_files_named_by_a_foreign_index(tmp_path, model):
    """save_pretrained removes the shards of an earlier save into the same directory, and nothing else."""
    d = tmp_path / "out"
    d.mkdir()
    victims = [tmp_path / "victim.safetensors", d / "notes.txt"]
    for v in victims:
        v.write_text("user data")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "../victim.safetensors", "b": str(victims[0]), "c": "notes.txt",
                        "d": "model.safetensors"}}))
    save_pretrained(model, d)
    assert all(v.read_text() == "user data" for v in victims)
    assert load_pretrained(d).config.vocab_size == VOCAB  # the file just written is not an "old shard"
    (d / "model.safetensors.index.json").write_text("{not json")
    save_pretrained(model, d)  # an unreadable index of the output directory names nothing to delete
    assert load_pretrained(d).config.vocab_size == VOCAB


def test_tokenizer_link_out_of_checkpoint_is_not_copied(hf_dir, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not copy me")
    os.symlink(secret, hf_dir / "generation_config.json")
    with pytest.raises(CheckpointError, match="generation_config.json.*outside"):
        quantize_checkpoint(hf_dir, tmp_path / "q")
    assert not (tmp_path / "q").exists()


# --------------------------------------------------------------------------------------------------
# 3. corrupt files: one line naming the file, on every verb that reads them

@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors(hf_dir, tmp_path, monkeypatch, damage):
    f = hf_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\xff" * 64, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid safetensors file"):
        load_pretrained(hf_dir)
    for argv in (["generate", hf_dir, "--prompt", "x"], ["eval", hf_dir], ["quantize", hf_dir, tmp_path / "q"]):
        rc, out, err = run_cli(argv)
        assert_one_line_error(rc, err, f"dsv3 {argv[0]}: error:", str(f), "not a valid safetensors file")

    from dsv3.inference import server

    def no_server(*a, **k):
        raise AssertionError("the server must not start")

    monkeypatch.setattr(server, "serve", no_server)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        server.load_for_serving(str(hf_dir), device="cpu")
    rc, _, err = run_cli(["serve", hf_dir, "--device", "cpu", "--port", "0"])  # (port 0: any free one, bound first)
    assert_one_line_error(rc, err, str(f))


def test_corrupt_shard_of_a_sharded_checkpoint(hf_dir, tmp_path, model):
    _, shard = _shard(hf_dir, tmp_path, model)
    (hf_dir / shard).write_bytes(b"\x00" * 16)
    rc, _, err = run_cli(["generate", hf_dir, "--prompt", "x"])
    assert_one_line_error(rc, err, shard, "not a valid safetensors file")


@pytest.mark.parametrize("content", ['{"version": "1.0", "model": 3}', "not json at all", ""])
def test_corrupt_tokenizer_json(hf_dir, content):
    (hf_dir / "tokenizer.json").write_text(content)
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: not a valid tokenizer file"):
        DSTokenizer.load(hf_dir)
    for verb in ("generate", "chat"):
        rc, _, err = run_cli([verb, hf_dir] + (["--prompt", "x"] if verb == "generate" else []))
        assert_one_line_error(rc, err, str(hf_dir / "tokenizer.json"), "not a valid tokenizer file")


def test_broken_chat_template_fails_at_load(hf_dir):
    cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }"
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json: chat_template does not compile"):
        DSTokenizer.load(hf_dir)
    (hf_dir / "tokenizer_config.json").write_text("{")
    rc, _, err = run_cli(["generate", hf_dir, "--prompt", "x", "--chat"])
    assert_one_line_error(rc, err, "tokenizer_config.json", "not valid JSON")


def test_mismatch_listing_is_one_line_and_traceback_on_request(hf_dir, monkeypatch):
    t = load_file(hf_dir / "model.safetensors")
    del t["model.norm.weight"]
    t["model.extra.weight"] = torch.zeros(2)
    save_file(t, hf_dir / "model.safetensors")
    rc, _, err = run_cli(["generate", hf_dir, "--prompt", "x"])
    assert_one_line_error(rc, err, "does not match", "missing tensors (1): model.norm.weight",
                          "unexpected tensors (1): model.extra.weight")
    monkeypatch.setenv("DSV3_TRACEBACK", "1")
    with pytest.raises(CheckpointError, match="does not match"):
        run_cli(["generate", hf_dir, "--prompt", "x"])


# --------------------------------------------------------------------------------------------------
# 4. siblings: run-directory files

def test_corrupt_run_directory_checkpoint_files(tmp_path, model, tok):
    opt = torch.optim.AdamW(model.parameters())
    path = rundir.save_checkpoint(str(tmp_path / "checkpoints"), 1, model, opt, {"tokens": 0, "sampler": {}},
                                  tokenizer=tok)
    opt_file = os.path.join(path, "optimizer.safetensors")
    with open(opt_file, "r+b") as f:
        f.truncate(10)
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors: not a valid safetensors file"):
        rundir.load_into(path, model, opt)
    with open(os.path.join(path, "trainer_state.json"), "w") as f:
        f.write('{"step": 1}')
    with pytest.raises(CheckpointError, match=r"trainer_state\.json: missing fields optimizer, rng"):
        rundir.load_into(path, model, opt)


def _stepped_checkpoint(tmp_path, model, tok):
    """A run-directory checkpoint after one AdamW step (every parameter has its step and moments), and its optimizer."""
    from dsv3.training.optim import AdamW

    opt = AdamW(model.parameters(), lr=1e-3, state_dtype=torch.float32)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return rundir.save_checkpoint(str(tmp_path / "checkpoints"), 1, model, opt, {"tokens": 64, "sampler": {}},
                                  tokenizer=tok), opt


def _first(t, suffix):
    return next(k for k in sorted(t) if k.endswith(suffix))


@pytest.mark.parametrize("edit, needle", [
    (lambda t: t.pop(_first(t, ".exp_avg")), ".exp_avg: missing"),
    (lambda t: t.update({_first(t, "proj.weight.exp_avg"): torch.zeros(3)}), "shape [3], parameter ["),
    (lambda t: t.update({_first(t, ".exp_avg_sq"): t[_first(t, ".exp_avg_sq")].to(torch.int32)}),
     "torch.int32, not floating point"),
    (lambda t: t.update({_first(t, ".step"): torch.zeros(2)}), ".step: shape [2], not one number"),
    (lambda t: t.update({"nodot": torch.zeros(1)}), "'nodot' is not <parameter>.<state>"),
])
def test_malformed_optimizer_state_is_named(tmp_path, model, tok, edit, needle):
    """A moment of another shape or dtype, or a parameter with part of its AdamW state, is refused at the load,
    naming the file and the tensor (it used to fail at the next step: an assertion's traceback, a bare KeyError,
    or integer moments trained on silently)."""
    path, opt = _stepped_checkpoint(tmp_path, model, tok)
    opt_file = os.path.join(path, "optimizer.safetensors")
    t = load_file(opt_file)
    edit(t)
    save_file(t, opt_file)
    for load in (lambda: rundir.load_into(path, model, opt), lambda: rundir.full_state(path)):
        with pytest.raises(CheckpointError, match="optimizer.safetensors: ") as e:
            load()
        assert needle in str(e.value) and "\n" not in str(e.value), e.value


@pytest.mark.parametrize("edit, needle", [
    (lambda st: st.pop("sampler"), "missing field sampler"),
    (lambda st: st.pop("tokens"), "missing field tokens"),
    (lambda st: st.update(step="1"), "step '1' is not an integer >= 0"),
    (lambda st: st.update(tokens=-5), "tokens -5 is not an integer >= 0"),
    (lambda st: st.update(sampler=[1]), "sampler is not a JSON object"),
    (lambda st: st.update(skipped_steps="x"), "skipped_steps 'x' is not an integer >= 0"),
])
def test_malformed_trainer_state_fields_are_named(tmp_path, model, tok, edit, needle):
    """The fields a resume reads (step, tokens, sampler) are checked with the file: missing ones used to end
    a resume as a bare KeyError ('dsv3 train: error: sampler'), wrongly typed ones with a traceback."""
    path, opt = _stepped_checkpoint(tmp_path, model, tok)
    ts = os.path.join(path, "trainer_state.json")
    with open(ts, encoding="utf-8") as f:
        st = json.load(f)
    edit(st)
    with open(ts, "w", encoding="utf-8") as f:
        json.dump(st, f)
    with pytest.raises(CheckpointError, match=r"trainer_state\.json: ") as e:
        rundir.load_into(path, model, opt)
    assert needle in str(e.value), e.value


@pytest.mark.parametrize("field,value", [("step", "6"), ("tokens", -1), ("skipped_steps", 1.0), ("sampler", [])])
def test_malformed_sharded_trainer_state_fields_are_named(tmp_path, field, value):
    """A sharded (torchrun) checkpoint's trainer_state.json: the run state a resume reads is checked as a run
    directory's is, with the file and the field named (a TypeError's traceback mid-resume before)."""
    from dsv3.checkpoints.dcp import FORMAT, read_state

    state = {"format": FORMAT, "model_config": tiny_cfg().to_dict(), "layout": {"world_size": 2}, "step": 6,
             "tokens": 96, "sampler": {"epoch": 0}, "skipped_steps": 0}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state), encoding="utf-8")
    assert read_state(str(tmp_path))["step"] == 6
    state[field] = value
    (tmp_path / "trainer_state.json").write_text(json.dumps(state), encoding="utf-8")
    with pytest.raises(CheckpointError, match=rf"trainer_state\.json: {field} "):
        read_state(str(tmp_path))


def test_malformed_token_cache_meta(tmp_path):
    from dsv3.training.data import CorpusError, TokenCache

    (tmp_path / "meta.json").write_text("{trunc")
    with pytest.raises(CorpusError, match=r"meta\.json is malformed"):
        TokenCache.open(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "object", "splits": {}}))
    with pytest.raises(CorpusError, match=r"meta\.json is malformed"):
        TokenCache.open(tmp_path)


def test_torn_metrics_record_is_skipped(tmp_path):
    """A crash mid-write leaves a torn last line, which the resumed run appends to: plots skip it."""
    from dsv3.training.plots import read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0, "lr": 0.1}\n{"step": 2, "lo'
                                            '{"step": 2, "loss": 2.5, "lr": 0.1}\n[]\n')
    with pytest.warns(UserWarning) as caught:
        recs = read_metrics(str(tmp_path))
    assert [r["step"] for r in recs] == [1]
    assert [str(w.message).split("metrics.jsonl")[1] for w in caught] == [":2: skipped a malformed record",
                                                                          ":3: skipped a malformed record"]
