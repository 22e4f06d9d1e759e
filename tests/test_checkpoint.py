"""Checkpoints (src/transferlab/checkpoint.py): exact round trips, resuming that equals never
stopping, provenance, one clear error per kind of bad file, atomic writes, and partial
loading for transfer. See docs/checkpoints.md."""
import json
import os
import zipfile

import numpy as np
import pytest

import transferlab
from transferlab import GPT, GPTConfig
from transferlab import checkpoint as ck
from transferlab import masks as M
from transferlab.heads import head_param_names
from transferlab.checkpoint import CheckpointError
from transferlab.optim import SGD, AdamW
from transferlab.schedules import ReduceOnPlateau, WarmupCosine

V, T, L, NH, C, K = 25, 32, 2, 4, 64, 4


def make(head="lm", seed=0, **overrides):
    cfg = dict(vocab_size=V, block_size=T, n_layer=L, n_head=NH, n_embd=C, head=head,
               n_classes=K, dropout=0.1)
    cfg.update(overrides)
    return GPT(GPTConfig(**cfg), seed=seed)


def data(step, B=2, length=12):
    """The batch of a given step: the data position is all a run needs to continue."""
    rng = np.random.default_rng(1000 + step)
    return rng.integers(0, V, (B, length)), rng.integers(0, V, (B, length))


def train(model, opt, schedule, start, stop):
    losses = []
    for step in range(start, stop):
        opt.lr = schedule.lr_at(step)
        _, loss = model(*data(step))
        opt.step(model.backward())
        losses.append(loss)
    return losses


def setup(seed=0):
    model = make(seed=seed)
    M.freeze(model, "h.0.attn.*")
    M.set_mask(model, "h.1.mlp.c_fc.weight",
               (np.random.default_rng(seed).random((C, 4 * C)) < 0.5).astype(np.float32))
    opt = AdamW(model.params, lr=1e-3, weight_decay=0.1, masks=model.masks)
    schedule = WarmupCosine(lr_max=3e-3, total_steps=20, warmup_steps=3)
    return model, opt, schedule


@pytest.fixture
def saved(tmp_path):
    """A checkpoint after 4 steps of a masked AdamW run, and the objects that wrote it."""
    model, opt, schedule = setup()
    train(model, opt, schedule, 0, 4)
    path = tmp_path / "run.npz"
    digest = ck.save_checkpoint(path, model, opt, schedule, step=4,
                                extra={"data_position": 4, "history": [1.5, np.float32(1.25)]},
                                arrays={"best/wte.weight": model.params["wte.weight"]})
    return path, digest, model, opt, schedule


# ---------------------------------------------------------------------- round trips


def test_round_trip_is_exact(saved):
    path, digest, model, opt, schedule = saved
    c = ck.load_checkpoint(path)
    assert c.sha256 == digest == ck.file_sha256(path)
    assert set(c.params) == set(model.params)
    for name, p in model.params.items():
        assert c.params[name].dtype == p.dtype and np.array_equal(c.params[name], p), name
    assert set(c.masks) == set(model.masks)
    for name, m in model.masks.items():
        assert np.array_equal(c.masks[name], m), name
    want = opt.state_dict()
    assert c.optimizer_state["type"] == "AdamW"
    assert c.optimizer_state["hyperparameters"] == want["hyperparameters"]
    assert set(c.optimizer_state["state"]) == set(want["state"])
    for name, s in want["state"].items():
        got = c.optimizer_state["state"][name]
        assert got["step"] == s["step"]
        assert np.array_equal(got["exp_avg"], s["exp_avg"])
        assert np.array_equal(got["exp_avg_sq"], s["exp_avg_sq"])
    assert c.schedule_state == schedule.state_dict()
    assert c.step == 4
    assert c.rng_state == model.rng.bit_generator.state
    assert c.extra == {"data_position": 4, "history": [1.5, 1.25]}
    assert c.config == model.config.to_dict()
    assert c.head == "lm" and c.tied
    assert np.array_equal(c.extra_arrays["best/wte.weight"], model.params["wte.weight"])


def test_file_layout_has_no_pickles(saved):
    path = saved[0]
    with np.load(path, allow_pickle=False) as npz:
        keys = set(npz.files)
        meta = npz["__meta__"]
        assert meta.ndim == 0 and meta.dtype.kind == "U"
        assert all(npz[k].dtype != object for k in keys)
    assert {"param/wte.weight", "mask/h.0.attn.c_attn.weight",
            "optim/state/wte.weight/exp_avg", "extra/best/wte.weight"} <= keys
    meta = json.loads(str(meta))
    assert (meta["format"], meta["version"]) == ("transferlab-checkpoint", 1)
    assert meta["optimizer"]["class"] == "AdamW"
    state = meta["optimizer"]["state"]["state"]["wte.weight"]
    assert state["exp_avg"] == {"__array__": "optim/state/wte.weight/exp_avg"}
    assert state["step"] == 4


def test_resume_continues_bit_identically(saved):
    path, _, model, opt, schedule = saved
    straight = train(model, opt, schedule, 4, 8)  # the run that never stopped

    fresh, fresh_opt, _ = setup(seed=1)  # other weights, masks and dropout RNG
    M.unfreeze_all(fresh)
    fresh_opt.masks = None
    fresh_schedule = WarmupCosine(lr_max=1.0, total_steps=99)
    c = ck.resume(path, fresh, fresh_opt, fresh_schedule)
    assert c.extra["data_position"] == 4
    resumed = train(fresh, fresh_opt, fresh_schedule, c.extra["data_position"], 8)

    assert resumed == straight
    for name, p in model.params.items():
        assert np.array_equal(fresh.params[name], p), name
    assert fresh.rng.bit_generator.state == model.rng.bit_generator.state
    assert set(fresh_opt.masks) == set(model.masks)
    for name, mask in fresh.masks.items():  # restored as masks.py makes them: read-only
        assert np.array_equal(mask, model.masks[name]) and not mask.flags.writeable, name
        with pytest.raises(ValueError, match="read-only"):
            mask[...] = 1


def test_resume_restores_a_plateau_schedule_and_sgd(tmp_path):
    model = make()
    opt = SGD(model.params, lr=0.1, momentum=0.9)
    plateau = ReduceOnPlateau(lr=0.1, patience=0)
    for metric in (1.0, 2.0, 3.0):
        plateau.step(metric)
    model(*data(0))
    opt.step(model.backward())
    ck.save_checkpoint(tmp_path / "p.npz", model, opt, plateau, step=1)
    other = ReduceOnPlateau(lr=0.1, patience=0)
    fresh = make(seed=3)
    other_opt = SGD(fresh.params, lr=0.5, momentum=0.9)
    ck.resume(tmp_path / "p.npz", fresh, other_opt, other)
    assert other.state_dict() == plateau.state_dict() and other.lr < 0.1
    assert other_opt.lr == opt.lr
    assert np.array_equal(other_opt.state["wte.weight"]["momentum_buffer"],
                          opt.state["wte.weight"]["momentum_buffer"])


def test_model_from_checkpoint_rebuilds_head_params_and_masks(tmp_path):
    model = make("sequence", head_hidden=16, pooling="mean")
    M.freeze_backbone(model)
    ck.save_checkpoint(tmp_path / "s.npz", model)
    rebuilt = ck.model_from_checkpoint(tmp_path / "s.npz")
    assert rebuilt.config == model.config
    assert rebuilt.params.keys() == model.params.keys()
    assert all(np.array_equal(rebuilt.params[n], p) for n, p in model.params.items())
    assert M.count(rebuilt) == M.count(model) == (C * 16 + 16 + 16 * K + K, M.count(model)[1])
    assert rebuilt.masks and not any(m.flags.writeable for m in rebuilt.masks.values())
    idx = data(0)[0]
    assert np.array_equal(rebuilt.eval()(idx)[0], model.eval()(idx)[0])


def test_untied_lm_round_trips(tmp_path):
    model = make(tie_weights=False)
    model.params["lm_head.weight"] += 1.0
    ck.save_checkpoint(tmp_path / "u.npz", model)
    c = ck.load_checkpoint(tmp_path / "u.npz")
    assert not c.tied
    rebuilt = ck.model_from_checkpoint(c)
    assert np.array_equal(rebuilt.params["lm_head.weight"], model.params["lm_head.weight"])


# ---------------------------------------------------------------------- provenance


def test_provenance_parent_hash_time_and_versions(tmp_path):
    model = make()
    parent_digest = ck.save_checkpoint(tmp_path / "parent.npz", model)
    ck.save_checkpoint(tmp_path / "child.npz", model, parent=tmp_path / "parent.npz")
    prov = ck.load_checkpoint(tmp_path / "child.npz").meta["provenance"]
    assert prov["parent_sha256"] == ck.file_sha256(tmp_path / "parent.npz") == parent_digest
    assert prov["parent_path"] == str(tmp_path / "parent.npz")
    assert prov["versions"] == {"python": prov["versions"]["python"], "numpy": np.__version__,
                                "transferlab": transferlab.__version__}
    assert prov["versions"]["python"].count(".") == 2
    assert prov["created_utc"].endswith("+00:00")
    # a digest works as a parent too, and no parent is recorded as None
    ck.save_checkpoint(tmp_path / "c2.npz", model, parent=parent_digest)
    c2 = ck.load_checkpoint(tmp_path / "c2.npz")
    assert c2.meta["provenance"]["parent_sha256"] == parent_digest
    assert ck.load_checkpoint(tmp_path / "parent.npz").meta["provenance"]["parent_sha256"] is None


def test_missing_parent_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="parent checkpoint .*nope.npz does not exist"):
        ck.save_checkpoint(tmp_path / "c.npz", make(), parent=tmp_path / "nope.npz")
    assert not (tmp_path / "c.npz").exists()


# ---------------------------------------------------------------------- bad files


def real_meta(tmp_path):
    ck.save_checkpoint(tmp_path / "good.npz", make())
    with np.load(tmp_path / "good.npz") as npz:
        return json.loads(str(npz["__meta__"]))


def write_truncated(tmp_path, path):
    ck.save_checkpoint(tmp_path / "good.npz", make())
    data = (tmp_path / "good.npz").read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_tail_cut(tmp_path, path):
    ck.save_checkpoint(tmp_path / "good.npz", make())
    path.write_bytes((tmp_path / "good.npz").read_bytes()[:-30])


def write_flipped_byte(tmp_path, path):
    ck.save_checkpoint(tmp_path / "good.npz", make())
    data = bytearray((tmp_path / "good.npz").read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside some array's bytes: the zip CRC catches it
    path.write_bytes(bytes(data))


def write_plain_zip(tmp_path, path):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("hello.txt", "not an array")


def write_object_array(tmp_path, path):
    meta = np.array(json.dumps(real_meta(tmp_path)))
    np.savez(path, __meta__=meta, **{"param/x": np.array([{"a": 1}, None], dtype=object)})


def write_random_bytes(tmp_path, path):
    path.write_bytes(np.random.default_rng(0).bytes(500))


def write_foreign_npz(tmp_path, path):
    np.savez(path, weights=np.ones(3), bias=np.zeros(2))


def write_foreign_format(tmp_path, path):
    np.savez(path, __meta__=np.array(json.dumps({"format": "someone-else", "version": 1})))


def write_future_version(tmp_path, path):
    meta = real_meta(tmp_path)
    meta["version"] = 2
    np.savez(path, __meta__=np.array(json.dumps(meta)))


def write_bad_json(tmp_path, path):
    np.savez(path, __meta__=np.array('{"format": "transferlab-checkpoint", "vers'))


def write_meta_without_step(tmp_path, path):
    meta = real_meta(tmp_path)
    del meta["step"]
    np.savez(path, __meta__=np.array(json.dumps(meta)))


def write_empty(tmp_path, path):
    path.write_bytes(b"")


def write_npy(tmp_path, path):
    with open(path, "wb") as f:
        np.save(f, np.ones(3))


@pytest.mark.parametrize("writer, message", [
    (None, "does not exist"),
    (write_truncated, "is truncated or corrupt"),
    (write_tail_cut, "is truncated or corrupt"),
    (write_flipped_byte, "is truncated or corrupt"),
    (write_empty, "is empty"),
    (write_plain_zip, "is not a transferlab checkpoint: a zip archive whose member 'hello.txt'"),
    (write_object_array, "holds object arrays; refusing to unpickle"),
    (write_random_bytes, r"is not a transferlab checkpoint: not an \.npz"),
    (write_npy, r"is not a transferlab checkpoint: not an \.npz"),
    (write_foreign_npz, "is not a transferlab checkpoint: an .npz without a '__meta__' entry"),
    (write_foreign_format, "is not a transferlab checkpoint: its format is 'someone-else'"),
    (write_future_version, "checkpoint format version 2 is not supported"),
    (write_bad_json, "is corrupt: its metadata is not valid JSON"),
    (write_meta_without_step, "is corrupt: its metadata lacks 'step'"),
])
def test_each_bad_file_gives_one_clear_error(tmp_path, writer, message):
    path = tmp_path / "bad.npz"
    if writer is not None:
        writer(tmp_path, path)
    with pytest.raises(ValueError, match=message) as err:  # what callers catch
        ck.load_checkpoint(path)
    assert err.type is CheckpointError
    assert str(path) in str(err.value)
    assert err.value.__cause__ is None  # the one message says it all, no chained traceback


def test_resume_refuses_a_different_model(saved):
    path = saved[0]
    other = make(dropout=0.0)
    before = other.state_dict()
    with pytest.raises(CheckpointError, match=r"dropout=0.1 in the checkpoint, 0.0 in the model"):
        ck.resume(path, other)
    assert all(np.array_equal(other.params[n], p) for n, p in before.items())


def test_resume_refuses_the_wrong_optimizer_and_leaves_the_model_alone(saved):
    path = saved[0]
    fresh = make(seed=5)
    before = fresh.state_dict()
    with pytest.raises(CheckpointError, match="cannot restore the optimizer: .*'AdamW', not 'SGD'"):
        ck.resume(path, fresh, SGD(fresh.params, lr=0.1))
    assert all(np.array_equal(fresh.params[n], p) for n, p in before.items())


def test_resume_needs_optimizer_state_when_given_an_optimizer(tmp_path):
    ck.save_checkpoint(tmp_path / "w.npz", make())
    fresh = make()
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        ck.resume(tmp_path / "w.npz", fresh, AdamW(fresh.params))


def test_resume_needs_schedule_state_when_given_a_schedule(tmp_path):
    model = make()
    ck.save_checkpoint(tmp_path / "w.npz", model, AdamW(model.params))
    with pytest.raises(CheckpointError, match="holds no schedule state"):
        ck.resume(tmp_path / "w.npz", make(), schedule=WarmupCosine(lr_max=1.0, total_steps=9))


def test_metadata_must_be_json(tmp_path):
    with pytest.raises(ValueError, match="JSON-able.*set"):
        ck.save_checkpoint(tmp_path / "x.npz", make(), extra={"seen": {1, 2}})
    with pytest.raises(ValueError, match="pass arrays via `arrays=`"):
        ck.save_checkpoint(tmp_path / "x.npz", make(), extra={"a": np.ones(3)})
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------- atomic write


def failing_savez(file, **arrays):
    file.write(b"PK\x03\x04 half a checkpoint")
    raise OSError("No space left on device")


@pytest.mark.parametrize("where", ["savez", "fsync", "replace"])
def test_failed_write_keeps_the_old_checkpoint(tmp_path, monkeypatch, where):
    path = tmp_path / "run.npz"
    ck.save_checkpoint(path, make(seed=0))
    old = path.read_bytes()
    if where == "savez":
        monkeypatch.setattr(np, "savez", failing_savez)
    else:
        def fail(*args, **kwargs):
            raise OSError(f"{where} failed")
        monkeypatch.setattr(os, where, fail)
    with pytest.raises(OSError):
        ck.save_checkpoint(path, make(seed=1), step=9)
    monkeypatch.undo()
    assert path.read_bytes() == old  # byte-identical
    assert os.listdir(tmp_path) == ["run.npz"]  # and no temporary file left behind
    assert ck.load_checkpoint(path).step == 0


def test_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(OSError):
        ck.save_checkpoint(tmp_path / "new.npz", make())
    assert os.listdir(tmp_path) == []


def test_write_goes_through_a_temporary_file_in_the_same_directory(tmp_path, monkeypatch):
    renames = []
    replace = os.replace

    def spy(src, dst):
        renames.append((os.fspath(src), os.fspath(dst)))
        assert zipfile.is_zipfile(src)  # complete before it gets the name
        replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    ck.save_checkpoint(tmp_path / "run.npz", make())
    [(src, dst)] = renames
    assert dst == str(tmp_path / "run.npz") and src != dst
    assert os.path.dirname(src) == str(tmp_path)


# ---------------------------------------------------------------------- partial loading


@pytest.fixture
def pretrained(tmp_path):
    """An LM checkpoint whose weights differ from any fresh model's."""
    model = make(seed=7)
    for p in model.params.values():
        p += 0.5
    path = tmp_path / "pretrained.npz"
    ck.save_checkpoint(path, model, step=1000)
    return path, model


def test_lm_checkpoint_into_a_sequence_model(pretrained):
    path, source = pretrained
    target = make("sequence", seed=1)
    head_before = {n: target.params[n].copy() for n in head_param_names(target)}
    rng_before = target.rng.bit_generator.state
    report = ck.load_into(target, path)
    assert report.missing == ["seq_head.weight", "seq_head.bias"]
    assert sorted(report.loaded) == sorted(source.params)
    assert not (report.unexpected or report.mismatched or report.resized)
    assert report.reasons["seq_head.weight"].startswith("not in the checkpoint")
    for name, p in source.params.items():
        assert np.array_equal(target.params[name], p), name
    for name, p in head_before.items():
        assert np.array_equal(target.params[name], p), name  # the new head keeps its init
    assert target.masks == {} and target.rng.bit_generator.state == rng_before


def test_include_exclude(pretrained):
    path, source = pretrained
    target = make(seed=1)
    own = target.state_dict()
    report = ck.load_into(target, path, include=["h.*", "ln_f.*"], exclude="h.1.mlp.*")
    blocks = [n for n in source.params if n.startswith("h.")]
    excluded = [n for n in blocks if n.startswith("h.1.mlp.")]
    wanted = set(blocks + ["ln_f.weight", "ln_f.bias"]) - set(excluded)
    assert sorted(report.loaded) == sorted(wanted)
    assert sorted(report.missing) == sorted(["wte.weight", "wpe.weight", *excluded])
    assert dict(report.ignored)["wte.weight"] == "not matched by include"
    assert dict(report.ignored)["h.1.mlp.c_fc.weight"] == "excluded by 'h.1.mlp.*'"
    assert report.reasons["h.1.mlp.c_fc.bias"] == "excluded by 'h.1.mlp.*'"
    for name in target.params:
        want = source.params[name] if name in report.loaded else own[name]
        assert np.array_equal(target.params[name], want), name


def test_rename_prefixes_and_callable(pretrained):
    path, source = pretrained
    target = make(seed=1)
    report = ck.load_into(target, path, rename={"h.0.": "h.1.", "h.1.": "h.0."})
    assert report.ok
    assert np.array_equal(target.params["h.1.attn.c_attn.weight"],
                          source.params["h.0.attn.c_attn.weight"])
    assert np.array_equal(target.params["h.0.mlp.c_fc.bias"], source.params["h.1.mlp.c_fc.bias"])

    target = make(seed=1)
    report = ck.load_into(target, path, rename=lambda n: None if n.startswith("wpe") else n)
    assert report.missing == ["wpe.weight"]
    assert report.reasons["wpe.weight"] == "dropped by rename"

    with pytest.raises(ValueError, match="rename maps both"):
        ck.load_into(make(), path, rename={"h.0.": "h.1."})


def test_unknown_patterns_and_modes_are_refused(pretrained):
    path = pretrained[0]
    with pytest.raises(ValueError, match="pattern 'h.7.*' matches no parameter"):
        ck.load_into(make(), path, include="h.7.*")
    with pytest.raises(ValueError, match="resize must be"):
        ck.load_into(make(), path, resize="stretch")


def test_shape_mismatch_is_skipped_and_reported(pretrained):
    path, source = pretrained
    target = make("sequence", vocab_size=V + 1, seed=1)
    own = target.params["wte.weight"].copy()
    report = ck.load_into(target, path)
    assert report.mismatched == [("wte.weight", (V + 1, C), (V, C))]
    assert "resize='pad'" in report.reasons["wte.weight"]
    assert "wte.weight" in report.missing
    assert np.array_equal(target.params["wte.weight"], own)
    report = ck.load_into(target, path, resize="truncate")  # growing needs "pad"
    assert report.mismatched and not report.resized


def test_resize_pad_keeps_the_models_init_for_new_rows(pretrained):
    path, source = pretrained
    target = make("sequence", vocab_size=V + 1, seed=1)
    own = target.params["wte.weight"].copy()
    report = ck.load_into(target, path, resize="pad")
    assert report.resized == [("wte.weight", (V + 1, C), (V, C), "pad")]
    assert "wte.weight" in report.loaded and not report.mismatched
    wte = target.params["wte.weight"]
    assert np.array_equal(wte[:V], source.params["wte.weight"])
    assert np.array_equal(wte[V], own[V])
    assert "resized (pad): wte.weight (25, 64) -> (26, 64)" in str(report)


def test_resize_truncate_and_both(pretrained):
    path, source = pretrained
    target = make(block_size=16, vocab_size=V + 2, seed=1)
    report = ck.load_into(target, path, resize=("truncate", "pad"))
    assert sorted(report.resized) == [("wpe.weight", (16, C), (T, C), "truncate"),
                                      ("wte.weight", (V + 2, C), (V, C), "pad")]
    assert np.array_equal(target.params["wpe.weight"], source.params["wpe.weight"][:16])
    assert report.ok


def test_tied_checkpoint_fills_an_untied_lm_head(pretrained):
    path, source = pretrained
    target = make(tie_weights=False, seed=1)
    report = ck.load_into(target, path)
    assert report.ok
    assert np.array_equal(target.params["lm_head.weight"], source.params["wte.weight"])
